//! Images: checkpoints of jobs, stored as `<store>/<HOME>-<SEQ>/v<N>/`
//! (CRIU's files plus `krg.meta`), on a file system the nodes share.
//!
//! `krg.meta` layout (see docs/image-format.md):
//!
//! ```text
//! "KRGIMAGE"  8 bytes   magic
//! version     u32 LE    format version of this file (2; 1 is read too)
//! length      u32 LE    bytes of payload, at most META_BYTES_MAX
//! payload               postcard of ImageMeta
//! sha256      32 bytes  of the payload
//! ```
//!
//! Written to a temporary file, fsynced, then renamed. Directories and
//! files belong to root, 0700 and 0600, and an ACL lets the job's owner
//! read them (`crate::acl`): images hold memory contents, and CRIU, as
//! root, restores whatever they say, so nobody but root may change them. A
//! restart checks that (`check_untampered`).

use crate::job::spec::LaunchSpec;
use crate::job::stdio::{StdinCarry, StreamKeys};
use krg_types::{Gpid, NodeId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"KRGIMAGE";
/// Format 2 added [`ImageMeta::files`]; format 1 is still read.
pub const META_FORMAT_VERSION: u32 = 2;
/// A meta file is a few KiB (the job's environment included).
pub const META_BYTES_MAX: usize = 4 << 20;
pub const META_FILE: &str = "krg.meta";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a krg image ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} is from image format {found}; this krg reads formats 1 to {META_FORMAT_VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path} {reason}, so another user than root may have changed the image: krg restores only images that root alone can change")]
    Untrusted { path: PathBuf, reason: String },
}

/// What krg keeps with CRIU's files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageMeta {
    pub gpid: Gpid,
    pub version: u32,
    /// The node it was taken on.
    pub node: NodeId,
    pub created_ms: u64,
    /// What the job was started with (user, command, cwd, environment,
    /// capabilities at the time).
    pub spec: LaunchSpec,
    pub keys: StreamKeys,
    /// Stdin the job had not read yet.
    pub carry: StdinCarry,
    /// Bytes of CRIU's files.
    pub bytes: u64,
    /// CPU time the job had used when it was saved.
    #[serde(default)]
    pub cpu_ns: u64,
    /// The files a node restarting it must have (format 2; none in a
    /// format 1 image, for which nothing is checked).
    pub files: Vec<crate::job::needed_files::NeededFile>,
}

/// [`ImageMeta`] as format 1 wrote it: postcard encodes a struct as its
/// fields in order, so an older payload lacks the newer fields at its end.
#[derive(Deserialize)]
struct ImageMetaV1 {
    gpid: Gpid,
    version: u32,
    node: NodeId,
    created_ms: u64,
    spec: LaunchSpec,
    keys: StreamKeys,
    carry: StdinCarry,
    bytes: u64,
    cpu_ns: u64,
}

impl From<ImageMetaV1> for ImageMeta {
    fn from(v1: ImageMetaV1) -> ImageMeta {
        ImageMeta {
            gpid: v1.gpid,
            version: v1.version,
            node: v1.node,
            created_ms: v1.created_ms,
            spec: v1.spec,
            keys: v1.keys,
            carry: v1.carry,
            bytes: v1.bytes,
            cpu_ns: v1.cpu_ns,
            files: Vec::new(),
        }
    }
}

/// The replicated catalogue entry of an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub gpid: Gpid,
    pub version: u32,
    pub node: NodeId,
    pub uid: u32,
    pub user: String,
    pub command: String,
    pub created_ms: u64,
    pub bytes: u64,
    pub path: String,
    /// Time CRIU took to write it.
    pub dump_ms: u64,
}

pub fn job_dir(store: &Path, gpid: Gpid) -> PathBuf {
    store.join(format!("{}-{}", gpid.home_node(), gpid.seq()))
}

pub fn version_dir(store: &Path, gpid: Gpid, version: u32) -> PathBuf {
    job_dir(store, gpid).join(format!("v{version}"))
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Versions present for a job, ascending.
pub fn versions(store: &Path, gpid: Gpid) -> Vec<u32> {
    let mut v: Vec<u32> = fs::read_dir(job_dir(store, gpid))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// Creates `<store>/<job>/v<N>` for the next version: root's, 0700, and
/// readable by `uid` where the file system has ACLs.
pub fn create_version_dir(
    store: &Path,
    gpid: Gpid,
    uid: u32,
) -> Result<(u32, PathBuf), ImageError> {
    claim_job_dir(store, gpid, uid)?;
    // Another checkpoint of the same job may race: take the first free N.
    let mut n = versions(store, gpid).last().copied().unwrap_or(0) + 1;
    loop {
        let dir = version_dir(store, gpid, n);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                grant_owner_read_of(&dir, uid);
                return Ok((n, dir));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(io("cannot create the image directory", &dir)(e)),
        }
    }
}

/// Makes `<store>/<job>` root's and private (readable by `uid` where the
/// file system has ACLs), before a checkpoint or a move writes below it.
pub fn claim_job_dir(store: &Path, gpid: Gpid, uid: u32) -> Result<PathBuf, ImageError> {
    let job = job_dir(store, gpid);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&job)
        .map_err(io("cannot create the image directory", &job))?;
    // Made by an older krg, the job's directory may belong to its owner:
    // it becomes root's, as the versions below it must be.
    nix::unistd::chown(&job, Some(0.into()), Some(0.into()))
        .map_err(|e| io("cannot make root own", &job)(e.into()))?;
    fs::set_permissions(&job, fs::Permissions::from_mode(0o700))
        .map_err(io("cannot make private", &job))?;
    grant_owner_read_of(&job, uid);
    Ok(job)
}

/// Lets the job's owner `uid` read the files of a version directory once
/// they are written (CRIU's and `krg.meta`); `create_version_dir` has let
/// it into the directory.
pub fn grant_owner_read(dir: &Path, uid: u32) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            grant_owner_read_of(&entry.path(), uid);
        }
    }
}

fn grant_owner_read_of(path: &Path, uid: u32) {
    if uid == 0 {
        return;
    }
    if let Err(e) = crate::acl::grant_read(path, uid) {
        // Root still reads it; the owner does not.
        tracing::warn!(path = %path.display(), uid, error = %e, "cannot let the owner of an image read it");
    }
}

/// Whether nobody but root can have changed the image in `dir`: it and
/// its job's directory are directories (not links), root's, and writable
/// by nobody else (an ACL granting writes shows in the group bits).
pub fn check_untampered(dir: &Path) -> Result<(), ImageError> {
    let job = dir.parent().unwrap_or(dir);
    for path in [job, dir] {
        let meta = fs::symlink_metadata(path).map_err(io("cannot read", path))?;
        let untrusted = |reason: String| ImageError::Untrusted {
            path: path.to_path_buf(),
            reason,
        };
        if !meta.is_dir() {
            return Err(untrusted("is not a directory".into()));
        }
        if meta.uid() != 0 {
            return Err(untrusted(format!("belongs to uid {}", meta.uid())));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(untrusted(format!(
                "may be written by others (mode {:o})",
                meta.mode() & 0o777
            )));
        }
    }
    Ok(())
}

/// Bytes of the files in a directory (not recursive: CRIU's images are flat).
pub fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn write_meta(dir: &Path, meta: &ImageMeta) -> Result<(), ImageError> {
    let payload = postcard::to_stdvec(meta).map_err(|e| ImageError::Corrupt {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut bytes = Vec::with_capacity(payload.len() + 48);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&META_FORMAT_VERSION.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&Sha256::digest(&payload));
    let tmp = dir.join(format!(".{META_FILE}.tmp"));
    let path = dir.join(META_FILE);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io("cannot write", &tmp))?;
    f.write_all(&bytes).map_err(io("cannot write", &tmp))?;
    f.sync_all().map_err(io("cannot write", &tmp))?;
    fs::rename(&tmp, &path).map_err(io("cannot write", &path))
}

pub fn read_meta(dir: &Path) -> Result<ImageMeta, ImageError> {
    let path = dir.join(META_FILE);
    let corrupt = |reason: &str| ImageError::Corrupt {
        path: path.clone(),
        reason: reason.to_string(),
    };
    // Not through a link, and no more than a meta file can hold, whatever
    // the file says its size is (a device says 0).
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io("cannot read", &path))?;
    if !file.metadata().map_err(io("cannot read", &path))?.is_file() {
        return Err(corrupt("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take((META_BYTES_MAX + 48 + 1) as u64)
        .read_to_end(&mut bytes)
        .map_err(io("cannot read", &path))?;
    if bytes.len() > META_BYTES_MAX + 48 {
        return Err(corrupt("too large"));
    }
    if bytes.len() < 48 || &bytes[..8] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !(1..=META_FORMAT_VERSION).contains(&version) {
        return Err(ImageError::Version {
            path,
            found: version,
        });
    }
    let n = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if n > META_BYTES_MAX || bytes.len() != 16 + n + 32 {
        return Err(corrupt("bad length"));
    }
    let payload = &bytes[16..16 + n];
    if Sha256::digest(payload).as_slice() != &bytes[16 + n..] {
        return Err(corrupt("checksum mismatch"));
    }
    let meta = if version == 1 {
        postcard::from_bytes::<ImageMetaV1>(payload).map(ImageMeta::from)
    } else {
        postcard::from_bytes(payload)
    };
    meta.map_err(|e| corrupt(&e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::ExternalKey;
    use crate::job::needed_files::{NeededFile, Use};

    fn meta(files: Vec<NeededFile>) -> ImageMeta {
        let node = NodeId::new(3).unwrap();
        let gpid = Gpid::new(node, 7).unwrap();
        let pipe = |inode| ExternalKey::Pipe { inode };
        ImageMeta {
            gpid,
            version: 2,
            node,
            created_ms: 1_700_000_000_000,
            spec: LaunchSpec {
                gpid,
                uid: 1000,
                gid: 1000,
                groups: vec![1000],
                user: "u".into(),
                argv: vec![serde_bytes::ByteBuf::from(b"sleep".to_vec())],
                env: Vec::new(),
                cwd: serde_bytes::ByteBuf::from(b"/".to_vec()),
                umask: 0o022,
                rlimits: Vec::new(),
                tty: None,
                submitted_ms: 1,
                caps: Default::default(),
                no_migrate: false,
                local_view: false,
                nodes: Vec::new(),
            },
            keys: StreamKeys {
                stdin: pipe(1),
                stdout: pipe(2),
                stderr: pipe(3),
                status: pipe(4),
                tty: false,
            },
            carry: StdinCarry::default(),
            bytes: 4096,
            cpu_ns: 5,
            files,
        }
    }

    fn scratch(name: &str) -> PathBuf {
        crate::test_support::scratch_dir("image", name)
    }

    /// A meta file of `version` around `payload`, as `write_meta` frames it.
    fn framed(version: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes.extend_from_slice(&Sha256::digest(payload));
        bytes
    }

    #[test]
    fn a_meta_reads_back_with_its_files() {
        let dir = scratch("v2");
        let file = NeededFile {
            path: "/scratch/data".into(),
            dir: false,
            size: Some(5),
            how: Use::HasOpen,
        };
        write_meta(&dir, &meta(vec![file.clone()])).unwrap();
        let read = read_meta(&dir).unwrap();
        assert_eq!(
            (read.gpid, read.cpu_ns, read.files),
            (meta(vec![]).gpid, 5, vec![file])
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_format_1_meta_is_read_without_files_and_a_later_one_refused() {
        let dir = scratch("v1");
        // Format 1 is format 2 without the list at the end (postcard writes
        // an empty list as one zero byte).
        let mut payload = postcard::to_stdvec(&meta(vec![])).unwrap();
        assert_eq!(payload.pop(), Some(0));
        fs::write(dir.join(META_FILE), framed(1, &payload)).unwrap();
        let read = read_meta(&dir).unwrap();
        assert_eq!((read.bytes, read.cpu_ns, read.files.len()), (4096, 5, 0));
        assert_eq!(read.spec.user, "u");

        fs::write(dir.join(META_FILE), framed(3, &payload)).unwrap();
        let err = read_meta(&dir).unwrap_err().to_string();
        assert!(
            err.ends_with("is from image format 3; this krg reads formats 1 to 2"),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_meta_through_a_link_or_of_a_device_is_refused() {
        let dir = scratch("links");
        let elsewhere = dir.join("elsewhere");
        write_meta(&dir, &meta(vec![])).unwrap();
        fs::rename(dir.join(META_FILE), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join(META_FILE)).unwrap();
        let err = read_meta(&dir).unwrap_err().to_string();
        assert!(err.starts_with("cannot read"), "{err}");
        fs::remove_file(dir.join(META_FILE)).unwrap();
        // /dev/zero says it holds 0 bytes and never ends.
        std::os::unix::fs::symlink("/dev/zero", dir.join(META_FILE)).unwrap();
        assert!(read_meta(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_an_image_root_alone_can_change_is_trusted() {
        let store = scratch("trust");
        let gpid = meta(vec![]).gpid;
        let (n, dir) = create_version_dir(&store, gpid, 65534).unwrap();
        assert_eq!(n, 1);
        for path in [dir.parent().unwrap(), dir.as_path()] {
            let m = fs::metadata(path).unwrap();
            assert_eq!(m.uid(), 0, "{} is root's", path.display());
            assert_eq!(m.mode() & 0o027, 0, "{} is private", path.display());
        }
        check_untampered(&dir).unwrap();

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o770)).unwrap();
        let err = check_untampered(&dir).unwrap_err().to_string();
        assert!(err.contains("may be written by others (mode 770)"), "{err}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();

        nix::unistd::chown(dir.parent().unwrap(), Some(65534.into()), None).unwrap();
        let err = check_untampered(&dir).unwrap_err().to_string();
        assert!(
            err.contains(
                "belongs to uid 65534, so another user than root may have changed the image"
            ),
            "{err}"
        );
        // The next checkpoint takes the job's directory back.
        let (n, _) = create_version_dir(&store, gpid, 65534).unwrap();
        assert_eq!(n, 2);
        check_untampered(&dir).unwrap();
        fs::remove_dir_all(&store).unwrap();
    }
}
