//! Where training spends its steps on t ∈ [0, 1] (z_t = (1 − t)·x₀ + t·ε,
//! t = 1 pure noise): the samplers of the paper's §3.1, and its shift of t
//! towards noise for larger images (§5.3.2).

use rand::Rng;

/// A density over t, sampled by mapping a uniform or normal draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TimestepSampler {
    /// t ~ U(0, 1).
    Uniform,
    /// t = sigmoid(u), u ~ N(m, s²): the paper's best (m = 0, s = 1).
    LogitNormal { m: f64, s: f64 },
    /// t = f(u; s) = 1 − u − s·(cos²(π/2·u) − 1 + u), u ~ U(0, 1): more
    /// steps in the middle for s > 0, heavier tails than the logit-normal;
    /// s in [−1, 2/(π − 2)] keeps f monotone.
    Mode { s: f64 },
    /// t = 1 − 1/(tan(π/2·u) + 1), u ~ U(0, 1): the cosine schedule's
    /// log-SNR, mapped to rectified flow.
    CosMap,
}

impl TimestepSampler {
    /// `uniform`, `logit-normal:m,s`, `mode:s` or `cosmap`.
    ///
    /// # Errors
    /// A message naming what is accepted.
    pub fn parse(text: &str) -> Result<TimestepSampler, String> {
        let numbers = |args: &str, count: usize| -> Result<Vec<f64>, String> {
            let values: Vec<f64> = args
                .split(',')
                .map(|v| v.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| format!("`{text}`: the values after `:` must be numbers"))?;
            if values.len() != count || values.iter().any(|v| !v.is_finite()) {
                return Err(format!("`{text}`: give {count} finite number{}", if count == 1 { "" } else { "s" }));
            }
            Ok(values)
        };
        let sampler = match text.split_once(':') {
            None if text == "uniform" => TimestepSampler::Uniform,
            None if text == "cosmap" => TimestepSampler::CosMap,
            Some(("logit-normal", args)) => {
                let v = numbers(args, 2)?;
                TimestepSampler::LogitNormal { m: v[0], s: v[1] }
            }
            Some(("mode", args)) => TimestepSampler::Mode { s: numbers(args, 1)?[0] },
            _ => return Err(format!("`{text}` is not `uniform`, `logit-normal:m,s`, `mode:s` or `cosmap`")),
        };
        sampler.check().map(|()| sampler)
    }

    fn check(&self) -> Result<(), String> {
        match *self {
            TimestepSampler::LogitNormal { s, .. } if s <= 0.0 => Err(format!("logit-normal scale {s} must be positive")),
            TimestepSampler::Mode { s } if !(-1.0..=MODE_S_MAX).contains(&s) => {
                Err(format!("mode scale {s} is outside [−1, {MODE_S_MAX:.4}], where the map stops being monotone"))
            }
            _ => Ok(()),
        }
    }

    /// One t in [0, 1].
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        match *self {
            TimestepSampler::Uniform => rng.gen::<f64>(),
            TimestepSampler::LogitNormal { m, s } => sigmoid(m + s * standard_normal(rng)),
            TimestepSampler::Mode { s } => mode_map(rng.gen::<f64>(), s),
            TimestepSampler::CosMap => cosmap(rng.gen::<f64>()),
        }
    }

    /// The name [`TimestepSampler::parse`] reads.
    pub fn name(&self) -> String {
        match self {
            TimestepSampler::Uniform => "uniform".into(),
            TimestepSampler::LogitNormal { m, s } => format!("logit-normal:{m},{s}"),
            TimestepSampler::Mode { s } => format!("mode:{s}"),
            TimestepSampler::CosMap => "cosmap".into(),
        }
    }
}

/// The largest mode scale whose map is monotone on [0, 1].
pub const MODE_S_MAX: f64 = 2.0 / (std::f64::consts::PI - 2.0);

/// The mode sampler's map f(u; s).
pub fn mode_map(u: f64, s: f64) -> f64 {
    let c = (std::f64::consts::FRAC_PI_2 * u).cos();
    1.0 - u - s * (c * c - 1.0 + u)
}

/// CosMap's map: 1 − 1/(tan(π/2·u) + 1).
pub fn cosmap(u: f64) -> f64 {
    1.0 - 1.0 / ((std::f64::consts::FRAC_PI_2 * u).tan() + 1.0)
}

pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// N(0, 1) by Box–Muller, so the stream of t is the same on every platform.
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1 = 1.0 - rng.gen::<f64>(); // (0, 1]: ln is finite
    let u2 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The shift for an image of `pixels` when the schedule was made for
/// `reference_pixels`: α = sqrt(m / n) (the paper's §5.3.2); 1 when no
/// reference is set.
pub fn resolution_shift(reference_pixels: u64, pixels: u64) -> f64 {
    if reference_pixels == 0 {
        return 1.0;
    }
    flowfarm_core::shift::resolution_alpha(1.0, reference_pixels, pixels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The q-quantile of 20 000 draws.
    fn quantile(sampler: TimestepSampler, q: f64) -> f64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut draws: Vec<f64> = (0..20_000).map(|_| sampler.sample(&mut rng)).collect();
        draws.sort_by(f64::total_cmp);
        draws[(q * draws.len() as f64) as usize]
    }

    #[test]
    fn each_sampler_draws_its_density() {
        for q in [0.1, 0.25, 0.5, 0.75, 0.9] {
            // The quantile function of each density, from its definition.
            let z = match q {
                0.1 => -1.281_551_6,
                0.25 => -0.674_489_75,
                0.5 => 0.0,
                0.75 => 0.674_489_75,
                _ => 1.281_551_6,
            };
            let expected = [
                (TimestepSampler::Uniform, q),
                (TimestepSampler::LogitNormal { m: 0.0, s: 1.0 }, sigmoid(z)),
                (TimestepSampler::LogitNormal { m: -0.5, s: 0.7 }, sigmoid(-0.5 + 0.7 * z)),
                // f decreases in u, so t's q-quantile is f at u's (1 − q)-quantile.
                (TimestepSampler::Mode { s: 1.29 }, mode_map(1.0 - q, 1.29)),
                (TimestepSampler::CosMap, cosmap(q)),
            ];
            for (sampler, want) in expected {
                let got = quantile(sampler, q);
                assert!((got - want).abs() < 0.012, "{} at q = {q}: {got} against {want}", sampler.name());
            }
        }
    }

    #[test]
    fn samplers_parse_from_their_names_and_bad_ones_say_what_is_accepted() {
        for text in ["uniform", "logit-normal:0,1", "logit-normal:-0.5,0.7", "mode:1.29", "cosmap"] {
            let sampler = TimestepSampler::parse(text).unwrap();
            assert_eq!(TimestepSampler::parse(&sampler.name()).unwrap(), sampler, "{text}");
        }
        for (text, said) in [
            ("gaussian", "is not `uniform`, `logit-normal:m,s`, `mode:s` or `cosmap`"),
            ("logit-normal:0", "give 2 finite numbers"),
            ("logit-normal:0,x", "must be numbers"),
            ("logit-normal:0,0", "scale 0 must be positive"),
            ("mode:2", "outside [−1, 1.7519]"),
            ("mode:nan", "give 1 finite number"),
        ] {
            let err = TimestepSampler::parse(text).unwrap_err();
            assert!(err.contains(said), "{text}: {err}");
        }
    }

    #[test]
    fn the_shift_grows_with_the_pixel_count() {
        assert_eq!(resolution_shift(0, 1 << 20), 1.0);
        assert!((resolution_shift(256 * 256, 1024 * 1024) - 4.0).abs() < 1e-12);
        assert!((resolution_shift(64 * 64, 32 * 32) - 0.5).abs() < 1e-12);
    }
}
