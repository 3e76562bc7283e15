//! The lines `krg-init` writes on its status pipe (docs/architecture.md).

use std::io;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusLine {
    /// Host pid of the job's init.
    Pid(i32),
    /// pid of the command inside the job's PID namespace.
    Started(i32),
    /// A step before exec failed (`exec`, `cwd`, `uid`, ...).
    Failed {
        step: String,
        errno: i32,
    },
    Exit(i32),
    Signal {
        signal: i32,
        core: bool,
    },
}

/// Longest status line accepted.
pub const STATUS_LINE_BYTES_MAX: usize = 128;

pub fn parse(line: &str) -> Option<StatusLine> {
    let mut words = line.split_whitespace();
    let word = words.next()?;
    let num = |w: Option<&str>| w.and_then(|v| v.parse::<i32>().ok());
    Some(match word {
        "pid" => StatusLine::Pid(num(words.next())?),
        "started" => StatusLine::Started(num(words.next())?),
        "exit" => StatusLine::Exit(num(words.next())?),
        "signal" => StatusLine::Signal {
            signal: num(words.next())?,
            core: words.next() == Some("core"),
        },
        w => StatusLine::Failed {
            step: w.strip_suffix("-failed")?.to_string(),
            errno: num(words.next())?,
        },
    })
}

/// Splits a byte stream into status lines, bounded in length.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn push(&mut self, data: &[u8]) -> io::Result<Vec<StatusLine>> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                if let Some(l) = parse(&line) {
                    out.push(l);
                }
            } else {
                if self.pending.len() >= STATUS_LINE_BYTES_MAX {
                    return Err(io::Error::other("krg-init wrote an overlong status line"));
                }
                self.pending.push(b);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_line() {
        let mut s = LineSplitter::default();
        let lines = s
            .push(b"pid 123\nstarted 2\nexec-failed 2\nexit 127\nsignal 9 core\nsig")
            .unwrap();
        assert_eq!(
            lines,
            vec![
                StatusLine::Pid(123),
                StatusLine::Started(2),
                StatusLine::Failed {
                    step: "exec".into(),
                    errno: 2
                },
                StatusLine::Exit(127),
                StatusLine::Signal {
                    signal: 9,
                    core: true
                },
            ]
        );
        assert_eq!(
            s.push(b"nal 15\n").unwrap(),
            vec![StatusLine::Signal {
                signal: 15,
                core: false
            }]
        );
        assert!(s.push(&[b'x'; 200]).is_err());
    }
}
