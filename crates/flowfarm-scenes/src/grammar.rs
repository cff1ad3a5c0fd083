//! The caption grammar: colours × shapes × places (one object) or
//! relations (two objects) × backgrounds, every scene's caption, and the
//! caption read back.
//!
//! Invariant: the objects of a scene and its background have three
//! different colours, so each colour in an image is one thing.

/// A flat colour of the palette; far apart in RGB so that a pixel's nearest
/// palette colour is unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Colour {
    pub const ALL: [Colour; 8] =
        [Colour::Red, Colour::Green, Colour::Blue, Colour::Yellow, Colour::Purple, Colour::Orange, Colour::White, Colour::Black];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
        }
    }

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 170, 50],
            Colour::Blue => [30, 70, 230],
            Colour::Yellow => [245, 225, 30],
            Colour::Purple => [140, 40, 180],
            Colour::Orange => [250, 140, 20],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
        }
    }

    fn parse(word: &str) -> Option<Colour> {
        Colour::ALL.into_iter().find(|c| c.name() == word)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Shape {
    Circle,
    Square,
    /// Isosceles, pointing up, as wide as it is tall.
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }

    fn parse(word: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == word)
    }
}

/// Where a lone object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    Left,
    Right,
    Top,
    Bottom,
    Middle,
}

impl Place {
    pub const ALL: [Place; 5] = [Place::Left, Place::Right, Place::Top, Place::Bottom, Place::Middle];

    pub fn words(self) -> &'static str {
        match self {
            Place::Left => "on the left",
            Place::Right => "on the right",
            Place::Top => "at the top",
            Place::Bottom => "at the bottom",
            Place::Middle => "in the middle",
        }
    }

    /// Where its centre is, as fractions of the width and height.
    pub fn anchor(self) -> (f32, f32) {
        match self {
            Place::Left => (0.25, 0.5),
            Place::Right => (0.75, 0.5),
            Place::Top => (0.5, 0.25),
            Place::Bottom => (0.5, 0.75),
            Place::Middle => (0.5, 0.5),
        }
    }
}

/// Where the first of two objects is, relative to the second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    Above,
    Below,
    LeftOf,
    RightOf,
}

impl Relation {
    pub const ALL: [Relation; 4] = [Relation::Above, Relation::Below, Relation::LeftOf, Relation::RightOf];

    pub fn words(self) -> &'static str {
        match self {
            Relation::Above => "above",
            Relation::Below => "below",
            Relation::LeftOf => "to the left of",
            Relation::RightOf => "to the right of",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Object {
    pub colour: Colour,
    pub shape: Shape,
}

impl Object {
    fn words(self) -> String {
        format!("a {} {}", self.colour.name(), self.shape.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layout {
    One { object: Object, place: Place },
    Two { first: Object, relation: Relation, second: Object },
}

/// One caption's worth of picture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scene {
    pub layout: Layout,
    pub background: Colour,
}

impl Scene {
    /// The objects, first to last.
    pub fn objects(&self) -> Vec<Object> {
        match self.layout {
            Layout::One { object, .. } => vec![object],
            Layout::Two { first, second, .. } => vec![first, second],
        }
    }

    /// "a red circle on the left on a yellow background", "a red circle
    /// above a blue square on a yellow background".
    pub fn caption(&self) -> String {
        let subject = match self.layout {
            Layout::One { object, place } => format!("{} {}", object.words(), place.words()),
            Layout::Two { first, relation, second } => format!("{} {} {}", first.words(), relation.words(), second.words()),
        };
        format!("{subject} on a {} background", self.background.name())
    }

    /// The scene a caption of the grammar describes; None for any other text.
    pub fn parse(caption: &str) -> Option<Scene> {
        let (subject, background) = caption.trim().strip_suffix(" background")?.rsplit_once(" on a ")?;
        let background = Colour::parse(background)?;
        let object = |text: &str| -> Option<Object> {
            let mut words = text.strip_prefix("a ")?.split(' ');
            let (colour, shape) = (Colour::parse(words.next()?)?, Shape::parse(words.next()?)?);
            words.next().is_none().then_some(Object { colour, shape })
        };
        let layout = Place::ALL
            .into_iter()
            .find_map(|place| Some(Layout::One { object: object(subject.strip_suffix(place.words())?.strip_suffix(' ')?)?, place }))
            .or_else(|| {
                Relation::ALL.into_iter().find_map(|relation| {
                    let (first, second) = subject.split_once(&format!(" {} ", relation.words()))?;
                    Some(Layout::Two { first: object(first)?, relation, second: object(second)? })
                })
            })?;
        let scene = Scene { layout, background };
        scene.is_valid().then_some(scene)
    }

    /// Whether its objects and background have different colours.
    pub fn is_valid(&self) -> bool {
        let mut colours: Vec<Colour> = self.objects().iter().map(|o| o.colour).collect();
        colours.push(self.background);
        let count = colours.len();
        colours.sort();
        colours.dedup();
        colours.len() == count
    }

    /// Every scene of the grammar, in a fixed order.
    pub fn all() -> Vec<Scene> {
        let objects: Vec<Object> =
            Colour::ALL.into_iter().flat_map(|colour| Shape::ALL.into_iter().map(move |shape| Object { colour, shape })).collect();
        let mut layouts: Vec<Layout> =
            objects.iter().flat_map(|&object| Place::ALL.into_iter().map(move |place| Layout::One { object, place })).collect();
        for &first in &objects {
            for relation in Relation::ALL {
                for &second in &objects {
                    layouts.push(Layout::Two { first, relation, second });
                }
            }
        }
        layouts
            .into_iter()
            .flat_map(|layout| Colour::ALL.into_iter().map(move |background| Scene { layout, background }))
            .filter(Scene::is_valid)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_caption_reads_back_as_its_scene() {
        let all = Scene::all();
        // One object: 24 objects × 5 places × 7 backgrounds; two: 24 × 4 × 21 × 6.
        assert_eq!(all.len(), 24 * 5 * 7 + 24 * 4 * 21 * 6);
        for scene in &all {
            assert_eq!(Scene::parse(&scene.caption()), Some(*scene), "{}", scene.caption());
        }
        assert_eq!(all[0].caption(), "a red circle on the left on a green background");
    }

    #[test]
    fn text_outside_the_grammar_is_not_a_scene() {
        for text in [
            "",
            "a red circle",
            "a red circle on the left on a red background",
            "a red circle above a red square on a blue background",
            "a teal circle on the left on a red background",
            "a red hexagon on the left on a blue background",
            "two red circles on the left on a blue background",
            "a red circle somewhere on a blue background",
        ] {
            assert_eq!(Scene::parse(text), None, "{text}");
        }
    }
}
