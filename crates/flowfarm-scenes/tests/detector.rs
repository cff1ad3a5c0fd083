//! The detector against the drawings it must read: every image of the
//! dataset, at several sizes and in both splits, scores right; captions
//! that say something else score wrong.

use flowfarm_scenes::grammar::{Colour, Layout, Object, Place, Relation, Scene, Shape};
use flowfarm_scenes::{detect, draw, score, Dataset, Split};
use rand::SeedableRng;

#[test]
fn the_detector_reads_every_drawn_scene_right() {
    for (width, height) in [(32, 32), (64, 64), (48, 80), (128, 64)] {
        for split in [Split::Train, Split::HeldOut] {
            let data = Dataset::new(3, width, height, split).unwrap();
            let items = 400;
            let mut wrong = Vec::new();
            for i in 0..items {
                let item = data.item(i);
                let found = detect(&item.rgb, width, height).unwrap();
                let s = score(&item.scene, &found);
                if !(s.objects && s.positions && s.background) {
                    wrong.push(format!("{i}: {} → {s:?} {found:?}", item.caption));
                }
            }
            println!("{width}×{height} {split:?}: {} of {items} read right", items as usize - wrong.len());
            assert!(wrong.is_empty(), "{width}×{height} {split:?}: {} wrong:\n{}", wrong.len(), wrong.join("\n"));
        }
    }
}

#[test]
fn a_caption_that_says_something_else_scores_wrong() {
    let red_circle = Object { colour: Colour::Red, shape: Shape::Circle };
    let blue_square = Object { colour: Colour::Blue, shape: Shape::Square };
    let scene =
        Scene { layout: Layout::Two { first: red_circle, relation: Relation::Above, second: blue_square }, background: Colour::Yellow };
    let rgb = draw(&scene, 64, 64, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
    let found = detect(&rgb, 64, 64).unwrap();
    assert_eq!(score(&scene, &found), flowfarm_scenes::Score { objects: true, positions: true, background: true });
    let with = |layout, background| score(&Scene { layout, background }, &found);
    let below = with(Layout::Two { first: red_circle, relation: Relation::Below, second: blue_square }, Colour::Yellow);
    assert_eq!((below.objects, below.positions), (true, false));
    let triangle = Object { shape: Shape::Triangle, ..red_circle };
    let shape = with(Layout::Two { first: triangle, relation: Relation::Above, second: blue_square }, Colour::Yellow);
    assert_eq!((shape.objects, shape.positions), (false, true));
    let green = Object { colour: Colour::Green, ..blue_square };
    let missing = with(Layout::Two { first: red_circle, relation: Relation::Above, second: green }, Colour::Yellow);
    assert_eq!((missing.objects, missing.positions), (false, false));
    assert!(!with(Layout::One { object: red_circle, place: Place::Top }, Colour::White).background);
}

#[test]
fn a_plain_image_has_no_objects_and_bad_buffers_are_refused() {
    let plain: Vec<u8> = std::iter::repeat_n(Colour::Purple.rgb(), 32 * 32).flatten().collect();
    let found = detect(&plain, 32, 32).unwrap();
    assert_eq!((found.background, found.objects.len()), (Colour::Purple, 0));
    let err = detect(&plain[..10], 32, 32).unwrap_err().to_string();
    assert_eq!(err, "10 bytes is not a 32×32 RGB image (3072 bytes)");
    let err = draw(&Scene::all()[0], 40, 32, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap_err().to_string();
    assert_eq!(err, "40×32: sides must be positive multiples of 16");
}
