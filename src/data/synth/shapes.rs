//! Shape categories of the synthetic benchmark, as inside tests in a subject's local frame:
//! the subject fills roughly the unit disc, `u` to the right, `v` downwards.

/// The categories, in the order of their ids. Names are what prompts say.
pub const CATEGORIES: [&str; 8] = [
    "disk", "ring", "square", "triangle", "star", "heart", "cross", "diamond",
];

/// Is the local point (u, v) inside the shape of category `cat` (an index into [`CATEGORIES`])?
pub fn inside(cat: usize, u: f32, v: f32) -> bool {
    match cat {
        0 => u * u + v * v <= 0.92 * 0.92,
        1 => {
            let r2 = u * u + v * v;
            (0.5 * 0.5..=0.95 * 0.95).contains(&r2)
        }
        2 => u.abs() <= 0.78 && v.abs() <= 0.78,
        3 => {
            // Apex up at v = -0.9, base at v = 0.75, half-width 0.95 at the base.
            (-0.9..=0.75).contains(&v) && u.abs() <= 0.95 * (v + 0.9) / 1.65
        }
        4 => in_star(u, v),
        5 => {
            // The classic implicit heart (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up.
            let x = u * 1.25;
            let y = -v * 1.25 + 0.15;
            let a = x * x + y * y - 1.0;
            a * a * a - x * x * y * y * y <= 0.0
        }
        6 => {
            let (a, b) = (u.abs(), v.abs());
            (a <= 0.33 && b <= 0.92) || (a <= 0.92 && b <= 0.33)
        }
        7 => u.abs() / 0.75 + v.abs() / 0.95 <= 1.0,
        _ => false,
    }
}

/// A five-pointed star, point up, outer radius 1.0, inner radius 0.45 (even-odd polygon test).
fn in_star(u: f32, v: f32) -> bool {
    if u * u + v * v > 1.0 {
        return false;
    }
    static VERTICES: std::sync::OnceLock<[(f32, f32); 10]> = std::sync::OnceLock::new();
    let vs = VERTICES.get_or_init(|| {
        std::array::from_fn(|k| {
            let a = k as f32 * std::f32::consts::PI / 5.0;
            let r = if k % 2 == 0 { 1.0 } else { 0.45 };
            (r * a.sin(), -r * a.cos())
        })
    });
    let mut inside = false;
    for k in 0..10 {
        let (x0, y0) = vs[k];
        let (x1, y1) = vs[(k + 1) % 10];
        if (y0 > v) != (y1 > v) && u < x0 + (v - y0) * (x1 - x0) / (y1 - y0) {
            inside = !inside;
        }
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(cat: usize) -> f32 {
        let n = 200;
        let mut k = 0;
        for i in 0..n {
            for j in 0..n {
                let u = (i as f32 + 0.5) / n as f32 * 2.0 - 1.0;
                let v = (j as f32 + 0.5) / n as f32 * 2.0 - 1.0;
                k += inside(cat, u, v) as usize;
            }
        }
        k as f32 / (n * n) as f32
    }

    #[test]
    fn every_shape_has_a_substantial_distinct_area() {
        let areas: Vec<f32> = (0..CATEGORIES.len()).map(area).collect();
        for (c, a) in areas.iter().enumerate() {
            assert!(*a > 0.15 && *a < 0.8, "{} area {a}", CATEGORIES[c]);
        }
        assert!(inside(4, 0.0, -0.95), "star point up");
        assert!(!inside(4, 0.0, 0.95), "no star point down");
        assert!(!inside(1, 0.0, 0.0), "ring has a hole");
        assert!(inside(5, -0.45, -0.75) && !inside(5, 0.0, -0.75), "heart lobes and notch");
    }
}
