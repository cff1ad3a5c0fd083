//! A scene rasterised: flat colours, hard edges, objects sized and placed
//! from the caption with seeded jitter.
//!
//! Invariant: the jitter never makes the caption false. A lone object's
//! centre stays nearer its place's anchor than any other anchor; of two
//! objects, the distance along the relation's axis is always more than
//! twice the distance across it, and the two never overlap.

use rand::Rng;

use crate::grammar::{Layout, Object, Relation, Scene, Shape};
use crate::{check_size, SceneError};

/// One object's square box, in pixels.
#[derive(Debug, Clone, Copy)]
struct Placed {
    object: Object,
    cx: f32,
    cy: f32,
    side: f32,
}

/// Draws `scene` at `width` × `height` (positive multiples of 16) as RGB8
/// rows, sizes and positions jittered by `rng`.
///
/// # Errors
/// [`SceneError::Size`] for other sides.
pub fn draw(scene: &Scene, width: usize, height: usize, rng: &mut impl Rng) -> Result<Vec<u8>, SceneError> {
    check_size(width, height)?;
    let (w, h) = (width as f32, height as f32);
    let m = w.min(h);
    let mut jitter = |fraction: f32| rng.gen_range(-fraction..=fraction);
    let placed: Vec<Placed> = match scene.layout {
        Layout::One { object, place } => {
            let (ax, ay) = place.anchor();
            let side = m * 0.34 * (1.0 + jitter(0.1));
            vec![Placed { object, cx: ax * w + jitter(0.05) * w, cy: ay * h + jitter(0.05) * h, side }]
        }
        Layout::Two { first, relation, second } => {
            // Along the axis: 0.27 and 0.73 of the side, ± 0.03; across: the middle ± 0.08 of the short side.
            let along = |near: bool, jitter: &mut dyn FnMut(f32) -> f32| (if near { 0.27 } else { 0.73 }) + jitter(0.03);
            let across = |size: f32, jitter: &mut dyn FnMut(f32) -> f32| size * 0.5 + jitter(0.08) * m;
            let (first_near, vertical) = match relation {
                Relation::Above => (true, true),
                Relation::Below => (false, true),
                Relation::LeftOf => (true, false),
                Relation::RightOf => (false, false),
            };
            [(first, first_near), (second, !first_near)]
                .into_iter()
                .map(|(object, near)| {
                    let side = m * 0.28 * (1.0 + jitter(0.1));
                    let (cx, cy) = if vertical {
                        (across(w, &mut jitter), along(near, &mut jitter) * h)
                    } else {
                        (along(near, &mut jitter) * w, across(h, &mut jitter))
                    };
                    Placed { object, cx, cy, side }
                })
                .collect()
        }
    };
    let mut rgb = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let colour = placed.iter().rev().find(|p| covers(p, px, py)).map_or(scene.background, |p| p.object.colour);
            rgb.extend_from_slice(&colour.rgb());
        }
    }
    Ok(rgb)
}

/// Whether the pixel centre (`px`, `py`) is inside the object.
fn covers(p: &Placed, px: f32, py: f32) -> bool {
    let half = p.side / 2.0;
    let (dx, dy) = (px - p.cx, py - p.cy);
    match p.object.shape {
        Shape::Square => dx.abs() <= half && dy.abs() <= half,
        Shape::Circle => dx * dx + dy * dy <= half * half,
        // Apex at the top centre, base along the bottom: as wide as tall.
        Shape::Triangle => dy.abs() <= half && dx.abs() <= (dy + half) / 2.0,
    }
}
