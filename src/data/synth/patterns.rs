//! Colours and surface patterns of the synthetic subjects. Patterns live in the subject's local
//! frame (they turn and flip with it) and have features of about half a subject radius, i.e.
//! no finer than ~5 px at 64 px.

/// Clearly distinct saturated colours (or near-black). Every one has a channel spread of at
/// least 140 or all channels below 60, so none can equal a background pixel
/// (see `render::background`).
pub const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("orange", [250, 130, 10]),
    ("yellow", [245, 220, 20]),
    ("green", [30, 170, 50]),
    ("cyan", [20, 200, 220]),
    ("blue", [30, 60, 220]),
    ("purple", [150, 40, 200]),
    ("black", [25, 25, 25]),
];

pub const PATTERNS: [&str; 4] = ["solid", "stripes", "dots", "checker"];

/// The colour index at local point (u, v) for a subject with body colour `body`, pattern
/// colour `accent` and pattern `pattern` (an index into [`PATTERNS`]).
pub fn colour_at(pattern: usize, body: usize, accent: usize, u: f32, v: f32) -> usize {
    let on = match pattern {
        1 => ((v + 2.0) / 0.5).floor() as i32 % 2 == 1,
        2 => {
            let cu = (u / 0.9).round() * 0.9;
            let cv = (v / 0.9).round() * 0.9;
            (u - cu).powi(2) + (v - cv).powi(2) <= 0.27 * 0.27
        }
        3 => {
            let a = ((u + 2.0) / 0.55).floor() as i32;
            let b = ((v + 2.0) / 0.55).floor() as i32;
            (a + b) % 2 == 1
        }
        _ => false,
    };
    if on {
        accent
    } else {
        body
    }
}
