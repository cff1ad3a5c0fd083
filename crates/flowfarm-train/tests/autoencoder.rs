//! A tiny AutoencoderKL trained on procedural scenes: the reconstruction
//! error falls, and the saved folder is read by the engine as it trained.

use candle_core::{DType, Device, Tensor};
use flowfarm_engine::vae::{Decoding, Vae};
use flowfarm_scenes::{Dataset, Split};
use flowfarm_train::autoencoder::{image_batch, small_config, AutoencoderSettings, AutoencoderTrainer};

fn images(data: &Dataset, from: u64, count: u64) -> Tensor {
    let items: Vec<Vec<u8>> = (from..from + count).map(|i| data.item(i).rgb).collect();
    let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
    image_batch(&refs, 32, 32, &Device::Cpu).unwrap()
}

#[test]
fn the_autoencoder_learns_the_scenes_and_its_folder_reads_back_as_trained() {
    let data = Dataset::new(4, 32, 32, Split::Train).unwrap();
    let settings = AutoencoderSettings { lr: 6e-3, warmup_steps: 5, seed: 9, ..AutoencoderSettings::default() };
    let mut trainer = AutoencoderTrainer::new(small_config(vec![16, 32], 32), settings, &Device::Cpu).unwrap();
    // A few dozen steps on four images: enough to see every weight learn
    // (the whole grammar takes the `flowfarm train` budget).
    let batch = images(&data, 0, 4);
    let reconstruction: Vec<f32> = (0..40).map(|_| trainer.train_step(&batch).unwrap().reconstruction).collect();
    println!("reconstruction L1 per 10 steps: {:?}", reconstruction.chunks(10).map(|c| c.iter().sum::<f32>() / 10.0).collect::<Vec<_>>());
    let mean = |l: &[f32]| l.iter().sum::<f32>() / l.len() as f32;
    assert!(mean(&reconstruction[30..]) < 0.5 * mean(&reconstruction[..10]), "{reconstruction:?}");

    let unseen = images(&data, 10_000, 8);
    let (shift, scale) = trainer.latent_format(&unseen).unwrap();
    let dir = tempfile::tempdir().unwrap();
    trainer.save(dir.path(), shift, scale).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("vae/config.json")).unwrap()).unwrap();
    // serde_json reads decimals back to within an ulp, not always exactly.
    let close = |key: &str, want: f64| config[key].as_f64().is_some_and(|got| (got - want).abs() <= 1e-12 * want.abs());
    assert!(close("shift_factor", shift) && close("scaling_factor", scale), "{config}: shift {shift}, scale {scale}");

    // The engine reads the folder back: its latents have the measured
    // format (mean 0, deviation 1) and decode as the trained decoder does.
    let autoencoder = Vae::open_autoencoder(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let latents = autoencoder.encode(&unseen).unwrap();
    let values = latents.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let n = values.len() as f32;
    let m = values.iter().sum::<f32>() / n;
    let sd = (values.iter().map(|v| (v - m).powi(2)).sum::<f32>() / n).sqrt();
    assert!(m.abs() < 1e-3 && (sd - 1.0).abs() < 1e-3, "latent mean {m}, deviation {sd}");
    let decoder = Vae::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let decoded = decoder.decode(&latents, Decoding::Whole).unwrap();
    let (trained_mean, _) = trainer.vae().encode_distribution(&unseen).unwrap();
    let trained = trainer.vae().decode_raw(&trained_mean).unwrap();
    let diff = (decoded - &trained).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "the saved decoder differs from the trained one by {diff}");
    let error = (trained - &unseen).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap();
    println!("reconstruction L1 of unseen images {error:.4} (in [-1, 1]); latent shift {shift:.4}, scale {scale:.4}");
}
