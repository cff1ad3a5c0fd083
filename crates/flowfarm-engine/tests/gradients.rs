//! The model built for training ([`MmDit::load_trainable`]) computes what
//! the served model computes, and its gradients are the derivatives of that
//! computation: autograd against central finite differences.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use flowfarm_engine::mmdit::{MmDitConfig, Variant, WeightSource};
use flowfarm_engine::noise::initial_latent;
use flowfarm_engine::tiny::{random_weights, tiny_config};
use flowfarm_engine::{EngineError, MmDit};

/// Weights held as variables, as a trainer holds them.
struct Vars(HashMap<String, Var>);

impl WeightSource for Vars {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor, EngineError> {
        let var = self.0.get(name).ok_or_else(|| EngineError::MissingTensor { key: name.to_owned() })?;
        assert_eq!(var.dims(), shape, "{name}");
        Ok(var.as_tensor().to_dtype(dtype)?.to_device(device)?)
    }

    fn contains(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.0.get(name).map(|v| v.dims().to_vec())
    }
}

/// The weights scaled down (σ 0.2 → 0.05) so the tiny model's activations
/// stay in the range where F32 finite differences resolve its derivatives.
fn weights(config: &MmDitConfig) -> HashMap<String, Tensor> {
    random_weights(config, 21)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let scaled =
                if name.contains("norm_q") || name.contains("norm_k") || name.contains("norm_added") { t } else { (t * 0.25).unwrap() };
            (name, scaled)
        })
        .collect()
}

/// A scalar of the velocity: its inner product with a fixed random tensor.
fn objective(model: &MmDit) -> Tensor {
    let dev = Device::Cpu;
    let x = initial_latent(1, &[2, 16, 4, 6], &dev).unwrap();
    let t = Tensor::new(&[300f32, 800.0], &dev).unwrap();
    let context = initial_latent(2, &[2, 5, 48], &dev).unwrap();
    let pooled = initial_latent(3, &[2, 40], &dev).unwrap();
    let probe = initial_latent(4, &[2, 16, 4, 6], &dev).unwrap();
    let v = model.forward(&x, &t, &context, &pooled, &[]).unwrap();
    (v * probe).unwrap().sum_all().unwrap()
}

#[test]
fn the_trainable_model_computes_the_served_models_velocity_with_exact_gradients() {
    for variant in [Variant::Sd3Medium, Variant::Sd35Large, Variant::Sd35Medium] {
        let config = tiny_config(variant);
        let tensors = weights(&config);
        let vars = Vars(tensors.iter().map(|(n, t)| (n.clone(), Var::from_tensor(t).unwrap())).collect());
        let trainable = MmDit::load_trainable(config.clone(), &vars, DType::F32, &Device::Cpu).unwrap();
        let served = MmDit::load(config.clone(), &vars, DType::F32, &Device::Cpu).unwrap();
        let (a, b) = (objective(&trainable).to_scalar::<f32>().unwrap(), objective(&served).to_scalar::<f32>().unwrap());
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "{variant:?}: trainable {a}, served {b}");

        let grads = objective(&trainable).backward().unwrap();
        // One entry of a weight of each kind: embeddings, attention (QK-norm
        // where the variant has it), MLP, modulation, the second attention, the head.
        let mut probes = vec![
            ("pos_embed.proj.weight", 5),
            ("time_text_embed.timestep_embedder.linear_1.weight", 17),
            ("context_embedder.weight", 3),
            ("transformer_blocks.0.attn.to_q.weight", 40),
            ("transformer_blocks.1.attn.add_k_proj.weight", 9),
            ("transformer_blocks.1.ff.net.2.weight", 77),
            ("transformer_blocks.0.norm1.linear.weight", 101),
            ("transformer_blocks.2.attn.to_v.bias", 4),
            ("proj_out.weight", 12),
        ];
        if config.qk_norm {
            probes.push(("transformer_blocks.0.attn.norm_q.weight", 2));
        }
        if variant == Variant::Sd35Medium {
            probes.push(("transformer_blocks.0.attn2.to_k.weight", 30));
        }
        for (name, index) in probes {
            let var = &vars.0[name];
            let analytic = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{variant:?}: no gradient for {name}"));
            let analytic = analytic.flatten_all().unwrap().to_vec1::<f32>().unwrap()[index];
            let original = tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let at = |delta: f32| {
                let mut values = original.clone();
                values[index] += delta;
                var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap()).unwrap();
                let value = objective(&MmDit::load(config.clone(), &vars, DType::F32, &Device::Cpu).unwrap()).to_scalar::<f32>().unwrap();
                var.set(&tensors[name]).unwrap();
                f64::from(value)
            };
            let eps = 1e-2;
            let numeric = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
            let tolerance = 2e-2 * numeric.abs().max(0.05);
            assert!(
                (f64::from(analytic) - numeric).abs() <= tolerance,
                "{variant:?} {name}[{index}]: autograd {analytic}, finite difference {numeric}"
            );
        }
    }
}
