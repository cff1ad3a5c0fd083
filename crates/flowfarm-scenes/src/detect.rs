//! Reading a scene back from pixels, with no learnt parts: colour masks
//! (each pixel to its nearest palette colour), shape from the largest
//! blob's fill of its bounding box and which of the box's corners it
//! fills, position from its centroid.
//!
//! Shapes by their corners: a square fills all four, an upward triangle
//! the two at the bottom, a circle none. Where the corners say nothing
//! clear (a model's blurred edge), the fill decides: 1 for a square, π/4
//! for a circle, 1/2 for a triangle.

use crate::grammar::{Colour, Layout, Place, Relation, Scene, Shape};
use crate::SceneError;

/// A pixel further than this from every palette colour (Euclidean, RGB)
/// belongs to none.
const MAX_COLOUR_DISTANCE: f32 = 90.0;
/// A colour covering less than this share of a square of the image's
/// short side is noise, not an object (the smallest drawn triangle covers
/// about 0.03 of it).
const MIN_OBJECT_SHARE: f32 = 0.015;

/// One object found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectedObject {
    pub colour: Colour,
    pub shape: Shape,
    /// Centre of mass, as fractions of the width and height.
    pub centroid: (f32, f32),
    /// Pixels of its largest connected blob.
    pub area: usize,
    /// Its blob's pixels over its bounding box's.
    pub fill: f32,
}

/// What an image shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Detected {
    /// The most common palette colour.
    pub background: Colour,
    /// Every other colour with enough pixels, largest first.
    pub objects: Vec<DetectedObject>,
}

impl Detected {
    pub fn object(&self, colour: Colour) -> Option<&DetectedObject> {
        self.objects.iter().find(|o| o.colour == colour)
    }
}

/// How an image matches its scene.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Score {
    /// Every object of the scene is there, in its colour and shape.
    pub objects: bool,
    /// They are where the caption says (a lone object's place, or the
    /// first's relation to the second); false when one is missing.
    pub positions: bool,
    pub background: bool,
}

/// Finds the background and the objects in an RGB8 image.
///
/// # Errors
/// [`SceneError::Pixels`] when `rgb` is not width × height × 3 bytes.
pub fn detect(rgb: &[u8], width: usize, height: usize) -> Result<Detected, SceneError> {
    if rgb.len() != width * height * 3 || width == 0 || height == 0 {
        return Err(SceneError::Pixels { width, height, len: rgb.len() });
    }
    let labels: Vec<Option<Colour>> = rgb.chunks_exact(3).map(nearest_colour).collect();
    let mut counts = [0usize; Colour::ALL.len()];
    for colour in labels.iter().flatten() {
        counts[*colour as usize] += 1;
    }
    let background = Colour::ALL[(0..counts.len()).max_by_key(|&i| (counts[i], std::cmp::Reverse(i))).unwrap_or(0)];
    let short = width.min(height) as f32;
    let min_area = (short * short * MIN_OBJECT_SHARE).ceil() as usize;
    let mut objects: Vec<DetectedObject> = Colour::ALL
        .into_iter()
        .filter(|&c| c != background && counts[c as usize] >= min_area.max(1))
        .filter_map(|colour| {
            let blob = largest_blob(&labels, width, height, colour);
            (blob.len() >= min_area.max(1)).then(|| describe(colour, &blob, width, height))
        })
        .collect();
    objects.sort_by_key(|o| std::cmp::Reverse(o.area));
    Ok(Detected { background, objects })
}

/// Scores `detected` against the scene its caption describes.
pub fn score(scene: &Scene, detected: &Detected) -> Score {
    let found = |o: &crate::grammar::Object| detected.object(o.colour).filter(|d| d.shape == o.shape);
    let objects = scene.objects().iter().all(|o| found(o).is_some());
    let positions = match scene.layout {
        Layout::One { object, place } => detected.object(object.colour).is_some_and(|d| place_of(d.centroid) == place),
        Layout::Two { first, relation, second } => match (detected.object(first.colour), detected.object(second.colour)) {
            (Some(a), Some(b)) => relation_of(a.centroid, b.centroid) == relation,
            _ => false,
        },
    };
    Score { objects, positions, background: detected.background == scene.background }
}

/// The place whose anchor is nearest to a lone object's centroid.
pub fn place_of((x, y): (f32, f32)) -> Place {
    let distance = |p: &Place| {
        let (ax, ay) = p.anchor();
        (x - ax).powi(2) + (y - ay).powi(2)
    };
    Place::ALL.into_iter().min_by(|a, b| distance(a).total_cmp(&distance(b))).unwrap_or(Place::Middle)
}

/// Where the first centroid is relative to the second, along the axis
/// they are furthest apart on.
pub fn relation_of(first: (f32, f32), second: (f32, f32)) -> Relation {
    let (dx, dy) = (first.0 - second.0, first.1 - second.1);
    match (dy.abs() > dx.abs(), dy < 0.0, dx < 0.0) {
        (true, true, _) => Relation::Above,
        (true, false, _) => Relation::Below,
        (false, _, true) => Relation::LeftOf,
        (false, _, false) => Relation::RightOf,
    }
}

fn nearest_colour(pixel: &[u8]) -> Option<Colour> {
    let distance = |c: &Colour| -> f32 {
        let rgb = c.rgb();
        (0..3).map(|i| (f32::from(pixel[i]) - f32::from(rgb[i])).powi(2)).sum()
    };
    let best = Colour::ALL.into_iter().min_by(|a, b| distance(a).total_cmp(&distance(b)))?;
    (distance(&best) <= MAX_COLOUR_DISTANCE * MAX_COLOUR_DISTANCE).then_some(best)
}

/// The pixel indices of the largest 4-connected blob of `colour`.
fn largest_blob(labels: &[Option<Colour>], width: usize, height: usize, colour: Colour) -> Vec<usize> {
    let mut seen = vec![false; labels.len()];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..labels.len() {
        if seen[start] || labels[start] != Some(colour) {
            continue;
        }
        let mut blob = Vec::new();
        let mut stack = vec![start];
        seen[start] = true;
        while let Some(i) = stack.pop() {
            blob.push(i);
            let (x, y) = (i % width, i / width);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < width).then_some(i + 1),
                (y > 0).then(|| i - width),
                (y + 1 < height).then_some(i + width),
            ];
            for n in neighbours.into_iter().flatten() {
                if !seen[n] && labels[n] == Some(colour) {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
        if blob.len() > best.len() {
            best = blob;
        }
    }
    best
}

/// Shape, centroid and fill of one blob.
fn describe(colour: Colour, blob: &[usize], width: usize, height: usize) -> DetectedObject {
    let (xs, ys): (Vec<usize>, Vec<usize>) = blob.iter().map(|&i| (i % width, i / width)).unzip();
    let (x0, x1) = (xs.iter().copied().min().unwrap_or(0), xs.iter().copied().max().unwrap_or(0));
    let (y0, y1) = (ys.iter().copied().min().unwrap_or(0), ys.iter().copied().max().unwrap_or(0));
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    let fill = blob.len() as f32 / (bw * bh) as f32;
    let inside: std::collections::HashSet<usize> = blob.iter().copied().collect();
    // A corner is filled when most of a window a sixth of the box wide is.
    let (cw, ch) = ((bw / 6).max(1), (bh / 6).max(1));
    let filled = |left: bool, top: bool| {
        let xs = if left { x0..x0 + cw } else { x1 + 1 - cw..x1 + 1 };
        let ys = if top { y0..y0 + ch } else { y1 + 1 - ch..y1 + 1 };
        let hits = ys.flat_map(|y| xs.clone().map(move |x| y * width + x)).filter(|i| inside.contains(i)).count();
        hits * 2 > cw * ch
    };
    let corners = [filled(true, true), filled(false, true), filled(true, false), filled(false, false)];
    let shape = match corners {
        [true, true, true, true] => Shape::Square,
        [false, false, true, true] => Shape::Triangle,
        [false, false, false, false] => Shape::Circle,
        _ if fill >= 0.89 => Shape::Square,
        _ if fill <= 0.64 => Shape::Triangle,
        _ => Shape::Circle,
    };
    let n = blob.len().max(1) as f32;
    let centroid =
        ((xs.iter().sum::<usize>() as f32 / n + 0.5) / width as f32, (ys.iter().sum::<usize>() as f32 / n + 0.5) / height as f32);
    DetectedObject { colour, shape, centroid, area: blob.len(), fill }
}
