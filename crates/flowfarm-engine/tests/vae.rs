//! The VAE decoder against diffusers' AutoencoderKL (CPU, float32) on a tiny
//! random model in SD3's latent format. Fixture: tools/parity/make_vae_fixtures.py.

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::vae::{to_rgb8, Decoding, Vae};

mod support;

#[test]
fn decode_matches_diffusers() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f = candle_core::safetensors::load(dir.join("vae-tiny_decode.safetensors"), &Device::Cpu).unwrap();
    let dev = support::device();
    let vae = Vae::open(dir.join("vae-tiny"), DType::F32, &dev).unwrap();
    let on_dev = |name: &str| f[name].to_device(&dev).unwrap();
    let image = vae.decode(&on_dev("latent"), Decoding::Whole).unwrap().to_device(&Device::Cpu).unwrap();
    let reference = &f["image"];
    assert_eq!(image.dims(), reference.dims());
    let diff = (&image - reference).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    println!("VAE decode: max abs error {diff:.2e}");
    assert!(diff <= 1e-4, "max abs error {diff}");

    let (w, h, ours) = to_rgb8(&image.squeeze(0).unwrap()).unwrap();
    let (_, _, theirs) = to_rgb8(&reference.squeeze(0).unwrap()).unwrap();
    assert_eq!((w, h), (24, 16));
    let worst = ours.iter().zip(&theirs).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "uint8 pixels differ by {worst} levels");

    // Larger than a tile (16 latent cells), asked for tiles: decoded in
    // overlapping, blended tiles, as diffusers does after enable_tiling().
    let tiled = vae.decode(&on_dev("big_latent"), Decoding::Tiled).unwrap().to_device(&Device::Cpu).unwrap();
    assert_eq!(tiled.dims(), f["big_image_tiled"].dims());
    let diff = (&tiled - &f["big_image_tiled"]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    println!("VAE tiled decode (40×24 latent, 16-cell tiles): max abs error {diff:.2e}");
    assert!(diff <= 1e-4, "tiled decode differs by {diff}");

    // Larger than a tile and not asked for tiles: whole, as diffusers'
    // StableDiffusion3Pipeline decodes unless tiling is enabled.
    let whole = vae.decode(&on_dev("big_latent"), Decoding::Whole).unwrap().to_device(&Device::Cpu).unwrap();
    let w = candle_core::safetensors::load(dir.join("vae-tiny_whole_decode.safetensors"), &Device::Cpu).unwrap();
    let reference = &w["big_image_whole"];
    assert_eq!(whole.dims(), reference.dims());
    let diff = (&whole - reference).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    println!("VAE whole decode (40×24 latent, larger than a tile): max abs error {diff:.2e}");
    assert!(diff <= 1e-4, "whole decode differs by {diff}");
    let apart = (&whole - &tiled).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(apart > 1e-3, "tiled and whole decodes of a large latent differ (by {apart}): the choice matters");

    let wrong = Tensor::zeros((1, 4, 8, 8), DType::F32, &dev).unwrap();
    assert!(vae.decode(&wrong, Decoding::Whole).unwrap_err().to_string().contains("4 channels"));
}

/// Square power-of-two latents (what square images give: 1024² → 128×128):
/// candle 0.9.2's CPU conv2d got some of these shapes wrong, so the decoder
/// uses its own convolutions; this keeps the case covered.
#[test]
fn decode_matches_diffusers_on_square_latents() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f = candle_core::safetensors::load(dir.join("vae-tiny_decode.safetensors"), &Device::Cpu).unwrap();
    let vae = Vae::open(dir.join("vae-tiny"), DType::F32, &Device::Cpu).unwrap();
    let image = vae.decode(&f["square_latent"], Decoding::Whole).unwrap();
    let diff = (&image - &f["square_image"]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-4, "max abs error {diff}");
}

/// The same decoder read from an SD3-style single file (LDM names under
/// `first_stage_model.`) decodes exactly as the diffusers folder does.
#[test]
fn single_file_decoder_equals_the_diffusers_folder() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f = candle_core::safetensors::load(dir.join("vae-tiny_decode.safetensors"), &Device::Cpu).unwrap();
    let folder = Vae::open(dir.join("vae-tiny"), DType::F32, &Device::Cpu).unwrap();
    let single = Vae::open(dir.join("vae-tiny").join("single_file.safetensors"), DType::F32, &Device::Cpu).unwrap();
    for latent in ["latent", "square_latent", "big_latent"] {
        for decoding in [Decoding::Whole, Decoding::Tiled] {
            let (a, b) = (folder.decode(&f[latent], decoding).unwrap(), single.decode(&f[latent], decoding).unwrap());
            let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{latent}, {decoding:?}");
        }
    }
}

/// The encoder against diffusers' `vae.encode(image).latent_dist` on a
/// square and a non-square image (fixture: tools/parity/make_vae_encoder_fixture.py).
#[test]
fn encode_matches_diffusers() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let f = candle_core::safetensors::load(dir.join("vae-tiny_encode.safetensors"), &Device::Cpu).unwrap();
    let dev = support::device();
    let vae = Vae::open_autoencoder(dir.join("vae-tiny"), DType::F32, &dev).unwrap();
    assert!(vae.has_encoder());
    let max_abs = |a: &Tensor, b: &Tensor| {
        assert_eq!(a.dims(), b.dims());
        (a.to_device(&Device::Cpu).unwrap() - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    };
    for name in ["square", "wide"] {
        let image = f[&format!("{name}_image")].to_device(&dev).unwrap();
        let (mean, logvar) = vae.encode_distribution(&image).unwrap();
        let latent = vae.encode(&image).unwrap();
        let errors = [
            max_abs(&mean, &f[&format!("{name}_mean")]),
            max_abs(&logvar, &f[&format!("{name}_logvar")]),
            max_abs(&latent, &f[&format!("{name}_latent")]),
        ];
        println!("VAE encode ({name}): max abs error of mean, log-variance, latent {:.2e} {:.2e} {:.2e}", errors[0], errors[1], errors[2]);
        assert!(errors.iter().all(|&e| e <= 1e-4), "{name}: {errors:?}");
    }
    let odd = Tensor::zeros((1, 3, 31, 32), DType::F32, &dev).unwrap();
    let err = vae.encode(&odd).unwrap_err().to_string();
    assert!(err.contains("sides must be positive multiples of 2 to encode"), "{err}");
    // Rendering reads the decoder alone; a single file's encoder is not read.
    let decoder = Vae::open(dir.join("vae-tiny"), DType::F32, &Device::Cpu).unwrap();
    assert!(!decoder.has_encoder());
    let err = decoder.encode(&Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(err.contains("opened without its encoder: open it with Vae::open_autoencoder"), "{err}");
    let err = Vae::open_autoencoder(dir.join("vae-tiny/single_file.safetensors"), DType::F32, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("give a diffusers `vae/` folder"), "{err}");
}
