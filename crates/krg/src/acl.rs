//! Read access for one user to a file root owns, by a POSIX access ACL.
//!
//! A job's images hold its memory: its owner may read them, nobody else,
//! and nobody but root may change them, since CRIU, as root, restores what
//! they say (credentials included). Owning the files would let the user
//! change them; an ACL entry `user:UID:r` (and `r-x` on directories) gives
//! reading only. The ACL is the kernel's `system.posix_acl_access`
//! attribute (`include/uapi/linux/posix_acl_xattr.h`): a version word, then
//! entries of tag, permissions and id, in the order of their tags.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const XATTR_NAME: &std::ffi::CStr = c"system.posix_acl_access";
const XATTR_VERSION: u32 = 2;
const UNDEFINED_ID: u32 = u32::MAX;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

const READ: u16 = 4;
const WRITE: u16 = 2;
const EXECUTE: u16 = 1;

/// The ACL of a file or directory its owner (root) may read and change,
/// `uid` may read (and, a directory, search), and nobody else may touch.
fn owner_and_reader(uid: u32, directory: bool) -> Vec<u8> {
    let search = if directory { EXECUTE } else { 0 };
    let entries = [
        (USER_OBJ, READ | WRITE | search, UNDEFINED_ID),
        (USER, READ | search, uid),
        (GROUP_OBJ, 0, UNDEFINED_ID),
        (MASK, READ | search, UNDEFINED_ID),
        (OTHER, 0, UNDEFINED_ID),
    ];
    let mut bytes = XATTR_VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        bytes.extend_from_slice(&tag.to_le_bytes());
        bytes.extend_from_slice(&perm.to_le_bytes());
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    bytes
}

/// Lets `uid` read `path` (a regular file or a directory; a symbolic link
/// is refused), which its owner keeps the only one to change. The file
/// system must support ACLs (ext4, xfs, tmpfs, btrfs do; `EOPNOTSUPP`
/// otherwise).
pub fn grant_read(path: &Path, uid: u32) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_file() && !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a regular file nor a directory",
        ));
    }
    let value = owner_and_reader(uid, meta.is_dir());
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: both strings are NUL-terminated and `value` outlives the
    // call; lsetxattr does not follow a link put there since the check.
    let set = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            XATTR_NAME.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn encodes_the_entries_in_the_order_of_their_tags() {
        let bytes = owner_and_reader(1000, false);
        assert_eq!(bytes.len(), 4 + 5 * 8);
        assert_eq!(&bytes[..4], &2u32.to_le_bytes());
        let tags: Vec<u16> = bytes[4..]
            .chunks(8)
            .map(|e| u16::from_le_bytes([e[0], e[1]]))
            .collect();
        assert_eq!(tags, vec![USER_OBJ, USER, GROUP_OBJ, MASK, OTHER]);
        let user = &bytes[12..20];
        assert_eq!(u16::from_le_bytes([user[2], user[3]]), READ);
        assert_eq!(u32::from_le_bytes(user[4..8].try_into().unwrap()), 1000);
        let dir = owner_and_reader(1000, true);
        assert_eq!(u16::from_le_bytes([dir[14], dir[15]]), READ | EXECUTE);
    }

    #[test]
    fn the_kernel_takes_it_and_the_mode_shows_the_mask() {
        let dir = std::env::temp_dir().join(format!("krg-acl-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let file = dir.join("pages-1.img");
        std::fs::write(&file, b"pages").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let granted = grant_read(&dir, 65534).and_then(|()| grant_read(&file, 65534));
        match granted {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                eprintln!("the temporary directory's file system has no ACLs: {e}");
            }
            Err(e) => panic!("grant_read: {e}"),
            Ok(()) => {
                let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode(&dir), 0o750, "group bits are the mask, r-x");
                assert_eq!(mode(&file), 0o640, "group bits are the mask, r--");
            }
        }
        let link = dir.join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(grant_read(&link, 65534).is_err(), "a link is refused");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
