//! Pictures of a batch's results, made from the PNGs workers wrote.
//!
//! - [`compose`]: a contact sheet, one PNG with a batch's images side by side
//!   in job order, so a grid of prompts × seeds can be judged at a glance
//!   without opening hundreds of files (`farmctl results fetch --contact-sheet`).
//! - [`thumbnail`]: one image scaled down, for the coordinator's status page,
//!   which would otherwise send every full-size PNG to show a batch.
//!
//! Both read any PNG colour type and write 8-bit RGB.

/// Most images one sheet holds; a larger batch's sheet shows its first ones.
pub const MAX_IMAGES: usize = 1024;
/// Pixels between cells and around the sheet.
const GAP: u32 = 4;
const BACKGROUND: [u8; 3] = [32, 32, 32];

/// What keeps a sheet from being made.
#[derive(Debug, thiserror::Error)]
pub enum SheetError {
    #[error("image {index}: not a PNG this sheet can read: {reason}")]
    Decode { index: usize, reason: String },
    #[error("cell size {0}: give 16 to 2048 pixels")]
    Cell(u32),
    #[error("no images to put on a contact sheet")]
    Empty,
    #[error("writing the contact sheet: {0}")]
    Encode(String),
}

/// An RGB image, 8 bits a channel, rows top to bottom.
struct Rgb {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

fn decode(index: usize, png_bytes: &[u8]) -> Result<Rgb, SheetError> {
    let error = |reason: String| SheetError::Decode { index, reason };
    let mut decoder = png::Decoder::new(png_bytes);
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = decoder.read_info().map_err(|e| error(e.to_string()))?;
    let mut buffer = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buffer).map_err(|e| error(e.to_string()))?;
    let data = &buffer[..frame.buffer_size()];
    let channels = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Indexed => return Err(error("an indexed image left unexpanded".into())),
    };
    let pixels = data
        .chunks_exact(channels)
        .flat_map(|p| match channels {
            1 | 2 => [p[0], p[0], p[0]],
            _ => [p[0], p[1], p[2]],
        })
        .collect();
    Ok(Rgb { width: frame.width, height: frame.height, pixels })
}

/// `image` scaled to fit `cell` × `cell` with its aspect ratio kept: each
/// pixel the mean of the source pixels it covers (the nearest one when enlarging).
fn fit(image: &Rgb, cell: u32) -> Rgb {
    let scale = (cell as f64 / image.width as f64).min(cell as f64 / image.height as f64);
    let width = ((image.width as f64 * scale).round() as u32).clamp(1, cell);
    let height = ((image.height as f64 * scale).round() as u32).clamp(1, cell);
    let span = |i: u32, out: u32, src: u32| {
        let start = (i as u64 * src as u64 / out as u64) as u32;
        let end = (((i as u64 + 1) * src as u64 / out as u64) as u32).max(start + 1).min(src);
        start..end
    };
    let mut pixels = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        let rows = span(y, height, image.height);
        for x in 0..width {
            let cols = span(x, width, image.width);
            let mut sum = [0u64; 3];
            let mut n = 0u64;
            for sy in rows.clone() {
                for sx in cols.clone() {
                    let at = ((sy * image.width + sx) * 3) as usize;
                    for (c, total) in sum.iter_mut().enumerate() {
                        *total += u64::from(image.pixels[at + c]);
                    }
                    n += 1;
                }
            }
            pixels.extend(sum.map(|total| ((total + n / 2) / n) as u8));
        }
    }
    Rgb { width, height, pixels }
}

/// Lays `images` (PNG files, in job order) out in a near-square grid of
/// `cell`-pixel cells, each image centred in its cell, and returns the PNG.
///
/// # Errors
/// [`SheetError`] for an image that is not a PNG, a cell size out of range,
/// or no images.
pub fn compose(images: &[Vec<u8>], cell: u32) -> Result<Vec<u8>, SheetError> {
    if !(16..=2048).contains(&cell) {
        return Err(SheetError::Cell(cell));
    }
    let images = &images[..images.len().min(MAX_IMAGES)];
    if images.is_empty() {
        return Err(SheetError::Empty);
    }
    let columns = (images.len() as f64).sqrt().ceil() as u32;
    let rows = (images.len() as u32).div_ceil(columns);
    let width = columns * (cell + GAP) + GAP;
    let height = rows * (cell + GAP) + GAP;
    let mut sheet: Vec<u8> = BACKGROUND.iter().copied().cycle().take((width * height * 3) as usize).collect();
    for (index, bytes) in images.iter().enumerate() {
        let thumb = fit(&decode(index, bytes)?, cell);
        let (column, row) = (index as u32 % columns, index as u32 / columns);
        let left = GAP + column * (cell + GAP) + (cell - thumb.width) / 2;
        let top = GAP + row * (cell + GAP) + (cell - thumb.height) / 2;
        for y in 0..thumb.height {
            let from = (y * thumb.width * 3) as usize;
            let to = (((top + y) * width + left) * 3) as usize;
            sheet[to..to + (thumb.width * 3) as usize].copy_from_slice(&thumb.pixels[from..from + (thumb.width * 3) as usize]);
        }
    }
    encode(&Rgb { width, height, pixels: sheet })
}

/// `png_bytes` scaled to fit `size` × `size` with its aspect ratio kept,
/// as a PNG; an image already that small is returned as it is.
///
/// # Errors
/// [`SheetError`] for bytes that are not a PNG or a size out of 16..=2048.
pub fn thumbnail(png_bytes: &[u8], size: u32) -> Result<Vec<u8>, SheetError> {
    if !(16..=2048).contains(&size) {
        return Err(SheetError::Cell(size));
    }
    let image = decode(0, png_bytes)?;
    if image.width <= size && image.height <= size {
        return Ok(png_bytes.to_vec());
    }
    encode(&fit(&image, size))
}

fn encode(image: &Rgb) -> Result<Vec<u8>, SheetError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| SheetError::Encode(e.to_string()))?;
    writer.write_image_data(&image.pixels).map_err(|e| SheetError::Encode(e.to_string()))?;
    writer.finish().map_err(|e| SheetError::Encode(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(width: u32, height: u32, color: [u8; 3]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&color.repeat((width * height) as usize)).unwrap();
        writer.finish().unwrap();
        out
    }

    fn pixel(sheet: &Rgb, x: u32, y: u32) -> [u8; 3] {
        let at = ((y * sheet.width + x) * 3) as usize;
        [sheet.pixels[at], sheet.pixels[at + 1], sheet.pixels[at + 2]]
    }

    #[test]
    fn images_go_in_job_order_on_a_near_square_grid() {
        let (red, green, blue) = ([200, 0, 0], [0, 200, 0], [0, 0, 200]);
        let images = vec![solid(64, 64, red), solid(128, 32, green), solid(16, 16, blue)];
        let sheet = decode(0, &compose(&images, 32).unwrap()).unwrap();
        // Three images: two columns, two rows of 32-pixel cells.
        assert_eq!((sheet.width, sheet.height), (2 * 36 + 4, 2 * 36 + 4));
        let centre = |column: u32, row: u32| pixel(&sheet, 4 + column * 36 + 16, 4 + row * 36 + 16);
        assert_eq!(centre(0, 0), red);
        assert_eq!(centre(1, 0), green);
        assert_eq!(centre(0, 1), blue, "a small image is enlarged to its cell");
        assert_eq!(centre(1, 1), BACKGROUND, "no fourth image");
        // The wide image keeps its aspect ratio: 32 × 8, centred, background above it.
        assert_eq!(pixel(&sheet, 4 + 36 + 16, 4 + 2), BACKGROUND);
        assert_eq!(pixel(&sheet, 4 + 36 + 16, 4 + 13), green);
    }

    #[test]
    fn downscaling_averages_what_each_pixel_covers() {
        // A 2 × 1 checker of black and white fit into 1 pixel is mid grey.
        let image = Rgb { width: 2, height: 2, pixels: vec![0, 0, 0, 255, 255, 255, 255, 255, 255, 0, 0, 0] };
        let small = fit(&image, 1);
        assert_eq!((small.width, small.height, small.pixels.as_slice()), (1, 1, &[128u8, 128, 128][..]));
    }

    #[test]
    fn a_thumbnail_keeps_the_aspect_ratio_and_small_images_pass_through() {
        let wide = solid(400, 100, [10, 20, 30]);
        let thumb = decode(0, &thumbnail(&wide, 64).unwrap()).unwrap();
        assert_eq!((thumb.width, thumb.height), (64, 16));
        assert_eq!(pixel(&thumb, 32, 8), [10, 20, 30]);
        let small = solid(32, 32, [1, 2, 3]);
        assert_eq!(thumbnail(&small, 64).unwrap(), small);
        assert!(matches!(thumbnail(b"nope", 64), Err(SheetError::Decode { .. })));
        assert!(matches!(thumbnail(&small, 4096), Err(SheetError::Cell(4096))));
    }

    #[test]
    fn bad_input_is_named() {
        assert!(matches!(compose(&[b"not a png".to_vec()], 64), Err(SheetError::Decode { index: 0, .. })));
        assert!(matches!(compose(&[], 64), Err(SheetError::Empty)));
        assert!(matches!(compose(&[solid(4, 4, [0, 0, 0])], 8), Err(SheetError::Cell(8))));
    }
}
