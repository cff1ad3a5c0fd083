//! AdamW (Loshchilov & Hutter: weight decay applied to the weights, not
//! through the gradient), a linear warm-up of the learning rate, clipping
//! by the gradients' global norm, and an exponential moving average of the
//! weights. Each keeps its state as named tensors, so a checkpoint holds
//! all of it and a resumed run takes the same steps.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::TrainError;

/// AdamW's settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWSettings {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay, on matrices only (not biases, norm scales).
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

/// AdamW's first and second moments per variable, and its step count.
pub struct AdamW {
    settings: AdamWSettings,
    steps: u64,
    moments: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(settings: AdamWSettings) -> AdamW {
        AdamW { settings, steps: 0, moments: BTreeMap::new() }
    }

    /// Updates every variable that has a gradient, at learning rate `lr`.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn step(&mut self, vars: &BTreeMap<String, Var>, grads: &GradStore, lr: f64) -> Result<(), TrainError> {
        let AdamWSettings { beta1, beta2, eps, weight_decay } = self.settings;
        self.steps += 1;
        let t = self.steps as i32;
        let (correct1, correct2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        for (name, var) in vars {
            let Some(grad) = grads.get(var.as_tensor()) else { continue };
            let (m, v) = match self.moments.remove(name) {
                Some(state) => state,
                None => (grad.zeros_like()?, grad.zeros_like()?),
            };
            let m = ((m * beta1)? + (grad * (1.0 - beta1))?)?;
            let v = ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let update = ((&m / correct1)? / ((&v / correct2)?.sqrt()? + eps)?)?;
            let decay = if var.rank() >= 2 { 1.0 - lr * weight_decay } else { 1.0 };
            let next = ((var.as_tensor() * decay)? - (update * lr)?)?;
            var.set(&next.detach())?;
            self.moments.insert(name.clone(), (m.detach(), v.detach()));
        }
        Ok(())
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The moments as named tensors (`m.{name}`, `v.{name}`).
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (name, (m, v)) in &self.moments {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        out
    }

    /// AdamW as [`AdamW::state`] left it after `steps` steps.
    ///
    /// # Errors
    /// [`TrainError::Checkpoint`] for a moment without its pair.
    pub fn restore(settings: AdamWSettings, steps: u64, state: &HashMap<String, Tensor>) -> Result<AdamW, TrainError> {
        let mut moments = BTreeMap::new();
        for (key, m) in state {
            let Some(name) = key.strip_prefix("m.") else { continue };
            let v = state.get(&format!("v.{name}")).ok_or_else(|| TrainError::Checkpoint {
                path: format!("v.{name}"),
                reason: "the second moment of a variable with a first is missing".into(),
            })?;
            moments.insert(name.to_owned(), (m.clone(), v.clone()));
        }
        Ok(AdamW { settings, steps, moments })
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm`
/// (no scaling when it is not positive); returns the norm before.
///
/// # Errors
/// Tensor errors only.
pub fn clip_grad_norm(vars: &BTreeMap<String, Var>, grads: &mut GradStore, max_norm: f64) -> Result<f64, TrainError> {
    let mut squares = 0.0f64;
    for var in vars.values() {
        if let Some(g) = grads.get(var.as_tensor()) {
            squares += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = squares.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for var in vars.values() {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(norm)
}

/// The learning rate at `step` (0-based): rising linearly to `lr` over
/// `warmup` steps, then constant.
pub fn warmup_lr(lr: f64, warmup: u64, step: u64) -> f64 {
    if warmup == 0 || step >= warmup {
        lr
    } else {
        lr * (step + 1) as f64 / warmup as f64
    }
}

/// An exponential moving average of the weights, the weights a checkpoint
/// serves. Its decay warms up as min(decay, (1 + n)/(10 + n)), so a short
/// run's average is not its initialisation.
pub struct Ema {
    decay: f64,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// An average that starts at the variables' current values.
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn new(decay: f64, vars: &BTreeMap<String, Var>) -> Result<Ema, TrainError> {
        let shadow = vars.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<_, TrainError>>()?;
        Ok(Ema { decay, shadow })
    }

    /// An average restored from [`Ema::state`].
    pub fn restore(decay: f64, shadow: BTreeMap<String, Tensor>) -> Ema {
        Ema { decay, shadow }
    }

    /// Folds in the variables after update number `updates` (1-based).
    ///
    /// # Errors
    /// Tensor errors only.
    pub fn update(&mut self, vars: &BTreeMap<String, Var>, updates: u64) -> Result<(), TrainError> {
        let d = self.decay.min((1 + updates) as f64 / (10 + updates) as f64);
        for (name, var) in vars {
            let next = match self.shadow.get(name) {
                Some(old) => ((old * d)? + (var.as_tensor().detach() * (1.0 - d))?)?,
                None => var.as_tensor().copy()?,
            };
            self.shadow.insert(name.clone(), next);
        }
        Ok(())
    }

    pub fn state(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_minimises_a_quadratic_and_resumes_exactly() {
        let dev = Device::Cpu;
        let target = Tensor::new(&[[1.0f32, -2.0], [0.5, 3.0]], &dev).unwrap();
        let run = |steps: u64, from: Option<(AdamW, Tensor)>| {
            let (mut adam, start) = from
                .unwrap_or_else(|| (AdamW::new(AdamWSettings::default()), Tensor::zeros((2, 2), candle_core::DType::F32, &dev).unwrap()));
            let vars = BTreeMap::from([("w".to_owned(), Var::from_tensor(&start).unwrap())]);
            let mut losses = Vec::new();
            for _ in 0..steps {
                let loss = (vars["w"].as_tensor() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
                losses.push(loss.to_scalar::<f32>().unwrap());
                let grads = loss.backward().unwrap();
                adam.step(&vars, &grads, 0.1).unwrap();
            }
            (adam, vars["w"].as_tensor().copy().unwrap(), losses)
        };
        let (_, _, straight) = run(60, None);
        assert!(straight[59] < 0.05 * straight[0], "{straight:?}");
        let (adam, w, first) = run(30, None);
        let restored = AdamW::restore(AdamWSettings::default(), adam.steps(), &adam.state()).unwrap();
        let (_, _, rest) = run(30, Some((restored, w)));
        assert_eq!([first, rest].concat(), straight, "resuming from the saved state takes the same steps");
    }

    #[test]
    fn clipping_bounds_the_global_norm_and_warmup_rises_linearly() {
        let dev = Device::Cpu;
        let vars =
            BTreeMap::from([("a".to_owned(), Var::new(&[3.0f32], &dev).unwrap()), ("b".to_owned(), Var::new(&[4.0f32], &dev).unwrap())]);
        let loss = (vars["a"].as_tensor().sqr().unwrap().sum_all().unwrap() / 2.0)
            .unwrap()
            .add(&(vars["b"].as_tensor().sqr().unwrap().sum_all().unwrap() / 2.0).unwrap())
            .unwrap();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&vars, &mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped: Vec<f32> = ["a", "b"].iter().map(|n| grads.get(vars[*n].as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0]).collect();
        assert!((clipped[0] - 0.6).abs() < 1e-5 && (clipped[1] - 0.8).abs() < 1e-5, "{clipped:?}");
        assert_eq!((0..5).map(|s| warmup_lr(1.0, 4, s)).collect::<Vec<_>>(), vec![0.25, 0.5, 0.75, 1.0, 1.0]);
    }
}
