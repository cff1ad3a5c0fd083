//! Rectified-flow timestep shift (Esser et al. 2024, §5.3.2) and the sampling
//! sigmas of diffusers' `FlowMatchEulerDiscreteScheduler`.
//!
//! With z_t = (1 − t)·x0 + t·ε, the shift S_α(t) = α·t / (1 + (α − 1)·t) moves
//! every timestep towards noise. It scales the odds t / (1 − t) by α, so shifts
//! compose multiplicatively (S_a ∘ S_b = S_ab) and the log-SNR
//! λ(t) = 2·log((1 − t)/t) moves by −2·log α.

/// Number of training timesteps of SD3-class models (diffusers' `num_train_timesteps`).
pub const TRAIN_TIMESTEPS: u32 = 1000;

/// S_α(t) = α·t / (1 + (α − 1)·t), for t in [0, 1] and α > 0.
pub fn shift_timestep(alpha: f64, t: f64) -> f64 {
    alpha * t / (1.0 + (alpha - 1.0) * t)
}

/// Log signal-to-noise ratio of z_t = (1 − t)·x0 + t·ε: λ(t) = 2·log((1 − t)/t).
pub fn log_snr(t: f64) -> f64 {
    2.0 * ((1.0 - t) / t).ln()
}

/// The `steps + 1` sigmas a flow-matching Euler sampler walks, computed as
/// diffusers' `FlowMatchEulerDiscreteScheduler` (static shift) does:
/// σ_i = S_α(linspace(1, S_α(1/1000), steps)_i) for i < steps, then 0.
///
/// The lower end is shifted twice, as in the reference (its `sigma_min` is the
/// shifted training sigma); reproducing that keeps our samples equal to its.
/// `steps` must be at least 1.
pub fn flow_match_sigmas(alpha: f64, steps: u32) -> Vec<f64> {
    let start = 1.0;
    let end = shift_timestep(alpha, 1.0 / f64::from(TRAIN_TIMESTEPS));
    let n = steps.max(1) as usize;
    let mut sigmas: Vec<f64> = (0..n)
        .map(|i| {
            let frac = if n == 1 { 0.0 } else { i as f64 / (n - 1) as f64 };
            shift_timestep(alpha, start + (end - start) * frac)
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// α for the `resolution` policy: α = α_ref·sqrt(m / m_ref), m and m_ref in pixels.
pub fn resolution_alpha(alpha_ref: f64, reference_pixels: u64, pixels: u64) -> f64 {
    alpha_ref * (pixels as f64 / reference_pixels as f64).sqrt()
}

/// α for diffusers' dynamic shifting: mu is linear in the number of image
/// tokens between (base_seq_len, base_shift) and (max_seq_len, max_shift), and
/// the exponential time shift with σ = 1 equals S_α with α = e^mu.
pub fn dynamic_alpha(base_shift: f64, max_shift: f64, base_seq_len: u64, max_seq_len: u64, image_tokens: u64) -> f64 {
    let slope = (max_shift - base_shift) / (max_seq_len as f64 - base_seq_len as f64);
    let mu = base_shift + slope * (image_tokens as f64 - base_seq_len as f64);
    mu.exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shift_fixes_endpoints_and_identity() {
        for alpha in [0.5, 1.0, 3.0, 7.5] {
            assert_eq!(shift_timestep(alpha, 0.0), 0.0);
            assert!((shift_timestep(alpha, 1.0) - 1.0).abs() < 1e-15);
        }
        assert!((shift_timestep(1.0, 0.37) - 0.37).abs() < 1e-15);
        // α = 3 at t = 0.5 gives 0.75: the midpoint moves towards noise.
        assert!((shift_timestep(3.0, 0.5) - 0.75).abs() < 1e-15);
    }

    proptest! {
        #[test]
        fn shifts_compose_multiplicatively(a in 0.1f64..10.0, b in 0.1f64..10.0, t in 0.001f64..0.999) {
            let composed = shift_timestep(a, shift_timestep(b, t));
            let direct = shift_timestep(a * b, t);
            prop_assert!((composed - direct).abs() < 1e-12, "{composed} vs {direct}");
        }

        #[test]
        fn log_snr_moves_by_minus_two_log_alpha(a in 0.1f64..10.0, t in 0.001f64..0.999) {
            let moved = log_snr(shift_timestep(a, t)) - log_snr(t);
            prop_assert!((moved + 2.0 * a.ln()).abs() < 1e-9, "moved {moved}, expected {}", -2.0 * a.ln());
        }

        #[test]
        fn sigmas_decrease_from_one_to_zero(a in 0.5f64..8.0, n in 1u32..100) {
            let s = flow_match_sigmas(a, n);
            prop_assert_eq!(s.len(), n as usize + 1);
            prop_assert!((s[0] - 1.0).abs() < 1e-12);
            prop_assert_eq!(*s.last().unwrap(), 0.0);
            prop_assert!(s.windows(2).all(|w| w[0] > w[1]));
        }
    }

    #[test]
    fn resolution_policy_gives_reference_and_doubles_with_four_times_the_pixels() {
        let m_ref = 1024 * 1024;
        assert_eq!(resolution_alpha(3.0, m_ref, m_ref), 3.0);
        assert!((resolution_alpha(3.0, m_ref, 4 * m_ref) - 6.0).abs() < 1e-12);
        assert!((resolution_alpha(3.0, m_ref, m_ref / 4) - 1.5).abs() < 1e-12);
    }

    #[test]
    fn dynamic_alpha_hits_both_ends() {
        let base = dynamic_alpha(0.5, 1.15, 256, 4096, 256);
        let max = dynamic_alpha(0.5, 1.15, 256, 4096, 4096);
        assert!((base - 0.5f64.exp()).abs() < 1e-12);
        assert!((max - 1.15f64.exp()).abs() < 1e-12);
    }

    /// Printed by diffusers 0.42.1 with torch 2.15 (`FlowMatchEulerDiscreteScheduler(shift=α)`,
    /// `set_timesteps(N)`, `scheduler.sigmas`); the reference computes in float32,
    /// hence the tolerance of 1e-6.
    #[test]
    fn sigmas_match_diffusers() {
        let cases: &[(f64, u32, &[f64])] = &[
            (1.0, 4, &[1.0, 0.6669999957084656, 0.33399999141693115, 0.0010000000474974513, 0.0]),
            (3.0, 4, &[1.0, 0.857692301273346, 0.602150559425354, 0.008928571827709675, 0.0]),
            (
                6.0,
                10,
                &[
                    1.0,
                    0.9797260165214539,
                    0.954878032207489,
                    0.923711359500885,
                    0.8834645748138428,
                    0.8294931054115295,
                    0.753333330154419,
                    0.6377622485160828,
                    0.4415094256401062,
                    0.03478260710835457,
                    0.0,
                ],
            ),
        ];
        for (alpha, n, expected) in cases {
            let got = flow_match_sigmas(*alpha, *n);
            for (g, e) in got.iter().zip(expected.iter()) {
                assert!((g - e).abs() < 1e-6, "α={alpha} N={n}: got {got:?}, expected {expected:?}");
            }
        }
    }
}
