//! A progress report per denoising step on stderr: one line rewritten in place on a terminal,
//! one line per step otherwise (logs, pipes, tests).
use std::io::{IsTerminal, Write};

/// What the loop says after each step.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    /// 1-based among the steps run.
    pub done: usize,
    /// The steps run (img2img runs fewer than the schedule has).
    pub of: usize,
    /// The timestep the model was fed.
    pub timestep: f64,
    /// Wall time of this step.
    pub seconds: f64,
    /// With a step cache: whether this step computed the cached part (else it reused it).
    pub refreshed: Option<bool>,
}

/// Writes `Step`s to stderr.
pub struct Bar {
    terminal: bool,
}

impl Default for Bar {
    fn default() -> Self {
        Bar::stderr()
    }
}

impl Bar {
    pub fn stderr() -> Bar {
        Bar {
            terminal: std::io::stderr().is_terminal(),
        }
    }

    pub fn report(&mut self, s: Step) {
        let line = line(s);
        let mut err = std::io::stderr().lock();
        // Progress is best effort: a closed stderr does not stop the run.
        let _ = if self.terminal {
            let end = if s.done == s.of { "\n" } else { "" };
            write!(err, "\r\x1b[2K{line}{end}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
    }
}

/// `step 3/4 [=====>   ] t=251 0.012 s/step`
pub fn line(s: Step) -> String {
    const WIDTH: usize = 20;
    let filled = (s.done * WIDTH).checked_div(s.of).unwrap_or(WIDTH);
    let bar: String = (0..WIDTH)
        .map(|k| match k.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    let cache = match s.refreshed {
        Some(true) => " (computed)",
        Some(false) => " (cached)",
        None => "",
    };
    format!(
        "step {}/{} [{bar}] t={} {:.3} s/step{cache}",
        s.done, s.of, s.timestep, s.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_names_the_step_timestep_and_time() {
        let l = line(Step {
            done: 2,
            of: 4,
            timestep: 501.0,
            seconds: 0.25,
            refreshed: None,
        });
        assert!(l.starts_with("step 2/4 [==========>"), "{l}");
        assert!(l.ends_with("t=501 0.250 s/step"), "{l}");
    }
}
