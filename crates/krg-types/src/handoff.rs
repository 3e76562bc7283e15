//! What `krgd` hands a waiting krg-init (one started ahead of its job, see
//! `job/init_pool.rs` in `krg`): the job's krg-init arguments and its
//! environment, as one message on the init's fd 0. The job's four
//! descriptors travel alongside it (SCM_RIGHTS).
//!
//! Layout, integers little-endian u32: total length of what follows, the
//! number of arguments, the number of environment entries, then each
//! argument and each entry as its length and its bytes.

use crate::limits::{ARGV_BYTES_MAX, ENV_BYTES_MAX, ENV_ENTRIES_MAX};

/// Set in the environment of a krg-init started ahead of its job.
pub const POOLED_ENV: &str = "KRG_INIT_POOLED";

/// Set beside [`POOLED_ENV`] to the node's cluster view: the waiting init
/// mounts its /proc and binds the view's files ahead of its job.
pub const POOLED_VIEW_ENV: &str = "KRG_INIT_POOLED_VIEW";

/// Descriptors sent with the message: the job's stdin, stdout, stderr and
/// status pipe, which become the init's fds 0 to 3.
pub const FDS: usize = 4;

/// Largest message: the job's arguments and environment at their limits,
/// plus krg-init's own options and the lengths.
pub const MESSAGE_BYTES_MAX: usize = ARGV_BYTES_MAX + ENV_BYTES_MAX + (64 << 10);

/// Arguments and environment of a job's krg-init.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Handoff {
    pub args: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandoffError {
    #[error("the message is {0} bytes, more than krg-init accepts")]
    TooLarge(usize),
    #[error("the message is cut short")]
    Truncated,
    #[error("the message has {0} environment entries, more than krg-init accepts")]
    TooManyEntries(usize),
}

impl Handoff {
    /// The message, its total length first.
    pub fn encode(&self) -> Result<Vec<u8>, HandoffError> {
        let body: usize = 8 + self
            .args
            .iter()
            .chain(&self.env)
            .map(|w| 4 + w.len())
            .sum::<usize>();
        if body + 4 > MESSAGE_BYTES_MAX {
            return Err(HandoffError::TooLarge(body + 4));
        }
        if self.env.len() > ENV_ENTRIES_MAX {
            return Err(HandoffError::TooManyEntries(self.env.len()));
        }
        let mut out = Vec::with_capacity(body + 4);
        let put = |out: &mut Vec<u8>, n: usize| out.extend_from_slice(&(n as u32).to_le_bytes());
        put(&mut out, body);
        put(&mut out, self.args.len());
        put(&mut out, self.env.len());
        for word in self.args.iter().chain(&self.env) {
            put(&mut out, word.len());
            out.extend_from_slice(word);
        }
        Ok(out)
    }

    /// How many bytes follow the length prefix `first4`.
    pub fn body_len(first4: [u8; 4]) -> Result<usize, HandoffError> {
        let n = u32::from_le_bytes(first4) as usize;
        if n + 4 > MESSAGE_BYTES_MAX {
            return Err(HandoffError::TooLarge(n + 4));
        }
        Ok(n)
    }

    /// Reads the body (what follows the length prefix).
    pub fn decode(body: &[u8]) -> Result<Handoff, HandoffError> {
        let mut reader = Reader(body);
        let n_args = reader.number()?;
        let n_env = reader.number()?;
        if n_env > ENV_ENTRIES_MAX {
            return Err(HandoffError::TooManyEntries(n_env));
        }
        // Each word takes at least 4 bytes: a count beyond that is a lie.
        if n_args.saturating_add(n_env).saturating_mul(4) > body.len() {
            return Err(HandoffError::Truncated);
        }
        let mut words = Vec::with_capacity(n_args + n_env);
        for _ in 0..n_args + n_env {
            let len = reader.number()?;
            words.push(reader.take(len)?.to_vec());
        }
        let env = words.split_off(n_args);
        Ok(Handoff { args: words, env })
    }
}

/// What is left of a message being read.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HandoffError> {
        if self.0.len() < n {
            return Err(HandoffError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn number(&mut self) -> Result<usize, HandoffError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Handoff {
        Handoff {
            args: vec![
                b"--uid".to_vec(),
                b"1000".to_vec(),
                Vec::new(),
                b"sh".to_vec(),
            ],
            env: vec![b"A=1".to_vec(), b"EMPTY=".to_vec()],
        }
    }

    #[test]
    fn a_message_reads_back_as_written() {
        let message = sample().encode().unwrap();
        let n = Handoff::body_len(message[..4].try_into().unwrap()).unwrap();
        assert_eq!(n, message.len() - 4);
        assert_eq!(Handoff::decode(&message[4..]).unwrap(), sample());
    }

    #[test]
    fn a_short_or_oversized_message_is_refused() {
        let message = sample().encode().unwrap();
        for cut in [0, 3, 8, message.len() - 5] {
            assert_eq!(
                Handoff::decode(&message[4..4 + cut]),
                Err(HandoffError::Truncated),
                "cut at {cut}"
            );
        }
        let huge = (MESSAGE_BYTES_MAX as u32).to_le_bytes();
        assert!(matches!(
            Handoff::body_len(huge),
            Err(HandoffError::TooLarge(_))
        ));
        let lying = [u32::MAX.to_le_bytes(), 0u32.to_le_bytes()].concat();
        assert_eq!(Handoff::decode(&lying), Err(HandoffError::Truncated));
        let big = Handoff {
            args: vec![vec![b'x'; MESSAGE_BYTES_MAX]],
            env: vec![],
        };
        assert!(matches!(big.encode(), Err(HandoffError::TooLarge(_))));
    }
}
