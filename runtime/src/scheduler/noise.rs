//! The noise stochastic steps add (Euler ancestral, DPM-Solver++ SDE, LCM): drawn from a seeded
//! generator, or read in order from a file of draws `[k, *latents shape]`, so that a
//! reference's exact noise can be replayed.
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Axis, IxDyn};

use crate::inputs::Rng;

pub struct Noise {
    source: Source,
}

enum Source {
    Seeded(Rng),
    File {
        path: PathBuf,
        draws: ArrayD<f32>,
        next: usize,
    },
}

impl Noise {
    pub fn seeded(seed: u64) -> Noise {
        Noise {
            source: Source::Seeded(Rng::new(seed)),
        }
    }

    /// The draws read from `path` ([k, *latents shape]), taken in order.
    pub fn from_file(path: &Path, draws: ArrayD<f32>) -> Noise {
        Noise {
            source: Source::File {
                path: path.to_path_buf(),
                draws,
                next: 0,
            },
        }
    }

    /// Whether draws come from the generator (not replayed from a file).
    pub(super) fn is_seeded(&self) -> bool {
        matches!(self.source, Source::Seeded(_))
    }

    /// Checks that `count` draws of `shape` are there (always, when seeded).
    pub(super) fn check(
        &self,
        count: usize,
        shape: &[usize],
        scheduler: &str,
    ) -> Result<(), String> {
        let Source::File { path, draws, .. } = &self.source else {
            return Ok(());
        };
        let p = path.display();
        if draws.ndim() != shape.len() + 1 || draws.shape()[1..] != *shape {
            return Err(format!(
                "--noise-file {p}: shape {:?}, expected [draws, {}] (one latents-shaped draw per noise the scheduler adds)",
                draws.shape(),
                shape
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if draws.shape()[0] < count {
            return Err(format!(
                "--noise-file {p}: {} draws, but {scheduler} takes {count} at these steps",
                draws.shape()[0]
            ));
        }
        Ok(())
    }

    /// The next draw, of `shape`.
    pub(super) fn draw(&mut self, shape: &[usize]) -> Result<ArrayD<f32>, String> {
        match &mut self.source {
            Source::Seeded(rng) => Ok(ArrayD::from_shape_fn(IxDyn(shape), |_| rng.normal() as f32)),
            Source::File { path, draws, next } => {
                if *next >= draws.shape()[0] || draws.shape()[1..] != *shape {
                    return Err(format!(
                        "--noise-file {}: draw {} of shape {shape:?} is not in its {:?}",
                        path.display(),
                        *next + 1,
                        draws.shape()
                    ));
                }
                let d = draws.index_axis(Axis(0), *next).to_owned();
                *next += 1;
                Ok(d)
            }
        }
    }
}
