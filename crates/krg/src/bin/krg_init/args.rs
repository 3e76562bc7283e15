//! The command line of `krg-init`, parsed by hand (no clap: the binary stays
//! small, and the command's words must pass through as raw `OsString`s):
//!
//! ```text
//! krg-init --uid U --gid G [--groups G1,G2,...] --cwd DIR [--umask OCTAL]
//!          [--rlimit NAME=SOFT:HARD ...] [--cgroup DIR ...] [--view DIR] [--pty] -- CMD ARGS...
//! ```
//!
//! Options take their value as the next word or after `=` (`--uid=1000`).
//! Every problem is one lower-case sentence; `main` prints it after
//! `krg-init: ` and exits with status 2.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

use nix::sys::resource::Resource;

/// Most supplementary groups the kernel accepts (`NGROUPS_MAX`).
pub const GROUPS_MAX: usize = 65_536;

/// The rlimit names `--rlimit` knows, as `ulimit` and `prlimit` spell them.
const RLIMIT_NAMES: [(&str, Resource); 16] = [
    ("as", Resource::RLIMIT_AS),
    ("core", Resource::RLIMIT_CORE),
    ("cpu", Resource::RLIMIT_CPU),
    ("data", Resource::RLIMIT_DATA),
    ("fsize", Resource::RLIMIT_FSIZE),
    ("locks", Resource::RLIMIT_LOCKS),
    ("memlock", Resource::RLIMIT_MEMLOCK),
    ("msgqueue", Resource::RLIMIT_MSGQUEUE),
    ("nice", Resource::RLIMIT_NICE),
    ("nofile", Resource::RLIMIT_NOFILE),
    ("nproc", Resource::RLIMIT_NPROC),
    ("rss", Resource::RLIMIT_RSS),
    ("rtprio", Resource::RLIMIT_RTPRIO),
    ("rttime", Resource::RLIMIT_RTTIME),
    ("sigpending", Resource::RLIMIT_SIGPENDING),
    ("stack", Resource::RLIMIT_STACK),
];

/// One `--rlimit NAME=SOFT:HARD`; `unlimited` is `RLIM_INFINITY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub name: &'static str,
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

/// What the job runs and as whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups; empty when `--groups` is absent, so that the
    /// command never keeps root's groups.
    pub groups: Vec<u32>,
    /// Absolute: a relative one would be relative to `krgd`'s cwd.
    pub cwd: OsString,
    /// `None` keeps the umask `krg-init` was started with.
    pub umask: Option<u32>,
    pub rlimits: Vec<Rlimit>,
    pub pty: bool,
    /// Cgroup directories the job joins before anything else happens.
    pub cgroups: Vec<OsString>,
    /// The cluster view to bind over the job's /proc and /sys files.
    pub view: Option<OsString>,
    /// `CMD ARGS...`, never empty.
    pub command: Vec<OsString>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    #[error("unknown option {0:?} (usage: krg-init --uid U --gid G [--groups G,...] --cwd DIR [--umask OCTAL] [--rlimit NAME=SOFT:HARD]... [--cgroup DIR]... [--view DIR] [--pty] -- CMD ARGS...)")]
    UnknownOption(String),
    #[error("unexpected word {0:?} before `--`; the command goes after `--`")]
    UnexpectedWord(String),
    #[error("option --{0} needs a value")]
    MissingValue(&'static str),
    #[error("option --{0} takes no value")]
    UnexpectedValue(&'static str),
    #[error("option --{0} is given twice")]
    Duplicate(&'static str),
    #[error("option --{0} is required")]
    Required(&'static str),
    #[error("--{option} {value:?} is not a valid id (0..=4294967294)")]
    BadId { option: &'static str, value: String },
    #[error("--groups lists {count} groups, more than the kernel's {GROUPS_MAX}")]
    TooManyGroups { count: usize },
    #[error("--cwd {0:?} is not an absolute path")]
    RelativeCwd(OsString),
    #[error("--cgroup or --view {0:?} is not an absolute path")]
    RelativeCgroup(OsString),
    #[error("--umask {0:?} is not an octal mode between 0 and 777")]
    BadUmask(String),
    #[error("--rlimit {value:?} is invalid: {reason}")]
    BadRlimit { value: String, reason: String },
    #[error("no command: give it after `--`")]
    NoCommand,
}

/// The options that take a value, as spelled after `--`.
#[derive(Clone, Copy)]
enum Opt {
    Uid,
    Gid,
    Groups,
    Cwd,
    Umask,
    Rlimit,
    Cgroup,
    View,
}

impl Opt {
    fn from_name(name: &str) -> Option<Opt> {
        Some(match name {
            "uid" => Opt::Uid,
            "gid" => Opt::Gid,
            "groups" => Opt::Groups,
            "cwd" => Opt::Cwd,
            "umask" => Opt::Umask,
            "rlimit" => Opt::Rlimit,
            "cgroup" => Opt::Cgroup,
            "view" => Opt::View,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Opt::Uid => "uid",
            Opt::Gid => "gid",
            Opt::Groups => "groups",
            Opt::Cwd => "cwd",
            Opt::Umask => "umask",
            Opt::Rlimit => "rlimit",
            Opt::Cgroup => "cgroup",
            Opt::View => "view",
        }
    }
}

#[derive(Default)]
struct Partial {
    uid: Option<u32>,
    gid: Option<u32>,
    groups: Option<Vec<u32>>,
    cwd: Option<OsString>,
    umask: Option<u32>,
    rlimits: Vec<Rlimit>,
    cgroups: Vec<OsString>,
    view: Option<OsString>,
    pty: bool,
}

/// Parses the words after the program name.
pub fn parse<I>(words: I) -> Result<Args, ArgsError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut words = words.into_iter();
    let mut partial = Partial::default();
    let mut command = Vec::new();
    while let Some(word) = words.next() {
        if word == "--" {
            command.extend(words.by_ref());
            break;
        }
        let text = lossy(&word);
        let Some(body) = text.strip_prefix("--") else {
            return Err(ArgsError::UnexpectedWord(text));
        };
        let (name, inline) = match body.split_once('=') {
            Some((name, _)) => (name, Some(word_after_eq(&word, name))),
            None => (body, None),
        };
        if name == "pty" {
            if inline.is_some() {
                return Err(ArgsError::UnexpectedValue("pty"));
            }
            if partial.pty {
                return Err(ArgsError::Duplicate("pty"));
            }
            partial.pty = true;
            continue;
        }
        let Some(opt) = Opt::from_name(name) else {
            return Err(ArgsError::UnknownOption(text));
        };
        let value = match inline {
            Some(value) => value,
            None => words.next().ok_or(ArgsError::MissingValue(opt.name()))?,
        };
        partial.set(opt, value)?;
    }
    partial.finish(command)
}

impl Partial {
    fn set(&mut self, opt: Opt, value: OsString) -> Result<(), ArgsError> {
        let text = lossy(&value);
        match opt {
            Opt::Uid => put(&mut self.uid, parse_id(opt, &text)?, opt),
            Opt::Gid => put(&mut self.gid, parse_id(opt, &text)?, opt),
            Opt::Groups => put(&mut self.groups, parse_groups(&text)?, opt),
            Opt::Cwd => {
                if !value.as_bytes().starts_with(b"/") {
                    return Err(ArgsError::RelativeCwd(value));
                }
                put(&mut self.cwd, value, opt)
            }
            Opt::Umask => put(&mut self.umask, parse_umask(&text)?, opt),
            Opt::View => {
                if !value.as_bytes().starts_with(b"/") {
                    return Err(ArgsError::RelativeCgroup(value));
                }
                put(&mut self.view, value, opt)
            }
            Opt::Cgroup => {
                if !value.as_bytes().starts_with(b"/") {
                    return Err(ArgsError::RelativeCgroup(value));
                }
                self.cgroups.push(value);
                Ok(())
            }
            Opt::Rlimit => {
                let rlimit = parse_rlimit(&text)?;
                if self.rlimits.iter().any(|r| r.resource == rlimit.resource) {
                    return Err(ArgsError::BadRlimit {
                        value: text,
                        reason: format!("{} is given twice", rlimit.name),
                    });
                }
                self.rlimits.push(rlimit);
                Ok(())
            }
        }
    }

    fn finish(self, command: Vec<OsString>) -> Result<Args, ArgsError> {
        if command.is_empty() {
            return Err(ArgsError::NoCommand);
        }
        Ok(Args {
            uid: self.uid.ok_or(ArgsError::Required("uid"))?,
            gid: self.gid.ok_or(ArgsError::Required("gid"))?,
            groups: self.groups.unwrap_or_default(),
            cwd: self.cwd.ok_or(ArgsError::Required("cwd"))?,
            umask: self.umask,
            rlimits: self.rlimits,
            pty: self.pty,
            cgroups: self.cgroups,
            view: self.view,
            command,
        })
    }
}

fn put<T>(slot: &mut Option<T>, value: T, opt: Opt) -> Result<(), ArgsError> {
    if slot.is_some() {
        return Err(ArgsError::Duplicate(opt.name()));
    }
    *slot = Some(value);
    Ok(())
}

fn lossy(word: &OsStr) -> String {
    word.to_string_lossy().into_owned()
}

/// The raw bytes after `--name=`, so that a non-UTF-8 `--cwd=` survives.
fn word_after_eq(word: &OsStr, name: &str) -> OsString {
    let skip = "--".len() + name.len() + "=".len();
    OsStr::from_bytes(word.as_bytes().get(skip..).unwrap_or_default()).to_os_string()
}

/// A uid or gid; `u32::MAX` is refused because it means "unchanged" to
/// `setresuid`/`setresgid`.
fn parse_id(opt: Opt, text: &str) -> Result<u32, ArgsError> {
    match parse_decimal(text).and_then(|n| u32::try_from(n).ok()) {
        Some(id) if id != u32::MAX => Ok(id),
        _ => Err(ArgsError::BadId {
            option: opt.name(),
            value: text.to_owned(),
        }),
    }
}

/// Digits only: `u64::from_str` would also take a leading `+`.
fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `--groups ""` is an empty list, like an absent `--groups`.
fn parse_groups(text: &str) -> Result<Vec<u32>, ArgsError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let count = text.split(',').count();
    if count > GROUPS_MAX {
        return Err(ArgsError::TooManyGroups { count });
    }
    text.split(',').map(|g| parse_id(Opt::Groups, g)).collect()
}

fn parse_umask(text: &str) -> Result<u32, ArgsError> {
    let octal =
        !text.is_empty() && text.len() <= 4 && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(text, 8) {
        Ok(mask) if octal && mask <= 0o777 => Ok(mask),
        _ => Err(ArgsError::BadUmask(text.to_owned())),
    }
}

fn parse_rlimit(text: &str) -> Result<Rlimit, ArgsError> {
    let bad = |reason: &str| ArgsError::BadRlimit {
        value: text.to_owned(),
        reason: reason.to_owned(),
    };
    let (name, limits) = text
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=SOFT:HARD"))?;
    let (soft, hard) = limits
        .split_once(':')
        .ok_or_else(|| bad("expected NAME=SOFT:HARD"))?;
    let (name, resource) = RLIMIT_NAMES
        .iter()
        .copied()
        .find(|(known, _)| *known == name)
        .ok_or_else(|| bad("unknown name (as, core, cpu, data, fsize, locks, memlock, msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack)"))?;
    let soft = parse_rlim(soft).ok_or_else(|| bad("SOFT is neither a number nor `unlimited`"))?;
    let hard = parse_rlim(hard).ok_or_else(|| bad("HARD is neither a number nor `unlimited`"))?;
    if soft > hard {
        return Err(bad("SOFT is above HARD"));
    }
    Ok(Rlimit {
        name,
        resource,
        soft,
        hard,
    })
}

fn parse_rlim(text: &str) -> Option<u64> {
    if text == "unlimited" {
        return Some(libc::RLIM_INFINITY);
    }
    parse_decimal(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn parse_str(list: &[&str]) -> Result<Args, ArgsError> {
        parse(words(list))
    }

    #[test]
    fn full_command_line() {
        let args = parse_str(&[
            "--uid",
            "1000",
            "--gid=100",
            "--groups",
            "4,24,27",
            "--cwd",
            "/home/u",
            "--umask",
            "022",
            "--rlimit",
            "nofile=1024:4096",
            "--rlimit=core=0:unlimited",
            "--pty",
            "--",
            "sh",
            "-c",
            "echo --uid",
        ])
        .expect("valid");
        assert_eq!(args.uid, 1000);
        assert_eq!(args.gid, 100);
        assert_eq!(args.groups, vec![4, 24, 27]);
        assert_eq!(args.cwd, "/home/u");
        assert_eq!(args.umask, Some(0o022));
        assert_eq!(args.rlimits.len(), 2);
        assert_eq!(args.rlimits[0].resource, Resource::RLIMIT_NOFILE);
        assert_eq!((args.rlimits[0].soft, args.rlimits[0].hard), (1024, 4096));
        assert_eq!(
            (args.rlimits[1].soft, args.rlimits[1].hard),
            (0, libc::RLIM_INFINITY)
        );
        assert!(args.pty);
        assert_eq!(args.command, words(&["sh", "-c", "echo --uid"]));
    }

    #[test]
    fn defaults() {
        let args =
            parse_str(&["--uid", "0", "--gid", "0", "--cwd", "/", "--", "true"]).expect("valid");
        assert!(args.groups.is_empty());
        assert_eq!(args.umask, None);
        assert!(args.rlimits.is_empty());
        assert!(!args.pty);
        let args = parse_str(&[
            "--uid", "0", "--gid", "0", "--groups", "", "--cwd", "/", "--", "true",
        ])
        .expect("valid");
        assert!(args.groups.is_empty());
    }

    #[test]
    fn non_utf8_cwd_and_command_pass_through() {
        let cwd = OsString::from(OsStr::from_bytes(b"/tmp/\xff"));
        let cmd = OsString::from(OsStr::from_bytes(b"\xfe"));
        let mut list = words(&["--uid", "1", "--gid", "1", "--cwd"]);
        list.push(cwd.clone());
        list.push("--".into());
        list.push(cmd.clone());
        let args = parse(list).expect("valid");
        assert_eq!(args.cwd, cwd);
        assert_eq!(args.command, vec![cmd]);
        let mut inline = OsString::from("--cwd=");
        inline.push(&cwd);
        let list = vec![
            inline,
            "--uid=1".into(),
            "--gid=1".into(),
            "--".into(),
            "x".into(),
        ];
        assert_eq!(parse(list).expect("valid").cwd, cwd);
    }

    #[test]
    fn refusals() {
        let base = ["--uid", "1", "--gid", "1", "--cwd", "/"];
        let with = |extra: &[&str], tail: &[&str]| {
            let mut list: Vec<&str> = base.to_vec();
            list.extend_from_slice(extra);
            list.extend_from_slice(tail);
            parse_str(&list)
        };
        let cmd = ["--", "true"];
        assert_eq!(
            parse_str(&["--gid", "1", "--cwd", "/", "--", "x"]),
            Err(ArgsError::Required("uid"))
        );
        assert_eq!(
            parse_str(&["--uid", "1", "--cwd", "/", "--", "x"]),
            Err(ArgsError::Required("gid"))
        );
        assert_eq!(
            parse_str(&["--uid", "1", "--gid", "1", "--", "x"]),
            Err(ArgsError::Required("cwd"))
        );
        assert_eq!(with(&[], &[]), Err(ArgsError::NoCommand));
        assert_eq!(with(&[], &["--"]), Err(ArgsError::NoCommand));
        assert_eq!(
            with(&["true"], &[]),
            Err(ArgsError::UnexpectedWord("true".into()))
        );
        assert_eq!(
            with(&["--uid", "2"], &cmd),
            Err(ArgsError::Duplicate("uid"))
        );
        assert_eq!(
            with(&["--pty", "--pty"], &cmd),
            Err(ArgsError::Duplicate("pty"))
        );
        assert_eq!(
            with(&["--pty=1"], &cmd),
            Err(ArgsError::UnexpectedValue("pty"))
        );
        assert_eq!(
            with(&["--bogus"], &cmd),
            Err(ArgsError::UnknownOption("--bogus".into()))
        );
        assert_eq!(
            with(&["--umask"], &[]),
            Err(ArgsError::MissingValue("umask"))
        );
        assert!(matches!(
            parse_str(&["--uid", "-1", "--gid", "1", "--cwd", "/", "--", "x"]),
            Err(ArgsError::BadId { .. })
        ));
        assert!(matches!(
            parse_str(&["--uid", "4294967295", "--gid", "1", "--cwd", "/", "--", "x"]),
            Err(ArgsError::BadId { .. })
        ));
        assert!(matches!(
            parse_str(&["--uid", "+1", "--gid", "1", "--cwd", "/", "--", "x"]),
            Err(ArgsError::BadId { .. })
        ));
        assert!(matches!(
            with(&["--groups", "1,,2"], &cmd),
            Err(ArgsError::BadId { .. })
        ));
        assert!(matches!(
            parse_str(&["--uid", "1", "--gid", "1", "--cwd", "tmp", "--", "x"]),
            Err(ArgsError::RelativeCwd(_))
        ));
        for umask in ["", "8", "1000", "0o22", "-1", "00000"] {
            assert!(
                matches!(with(&["--umask", umask], &cmd), Err(ArgsError::BadUmask(_))),
                "{umask}"
            );
        }
        for rlimit in [
            "nofile",
            "nofile=1",
            "nofile=2:1",
            "bogus=1:1",
            "nofile=x:1",
            "nofile=1:-1",
            "nofile=:1",
        ] {
            assert!(
                matches!(
                    with(&["--rlimit", rlimit], &cmd),
                    Err(ArgsError::BadRlimit { .. })
                ),
                "{rlimit}"
            );
        }
        assert!(matches!(
            with(&["--rlimit", "nofile=1:1", "--rlimit", "nofile=2:2"], &cmd),
            Err(ArgsError::BadRlimit { .. })
        ));
        let too_many = vec!["7"; GROUPS_MAX + 1].join(",");
        assert!(matches!(
            with(&["--groups", &too_many], &cmd),
            Err(ArgsError::TooManyGroups { .. })
        ));
    }

    #[test]
    fn messages_are_one_lower_case_sentence() {
        let errors = [
            ArgsError::Required("uid"),
            ArgsError::NoCommand,
            ArgsError::BadUmask("8".into()),
            ArgsError::UnknownOption("--x".into()),
        ];
        for error in errors {
            let text = error.to_string();
            assert!(!text.contains('\n'), "{text}");
            assert!(text.starts_with(|c: char| !c.is_uppercase()), "{text}");
        }
    }
}
