//! CRIU's own figures of a call: `stats-dump` and `stats-restore` in the
//! work directory (CRIU's `images/stats.proto`), read after the call.
//!
//! The file is a service image: `IMG_SERVICE_MAGIC`, `STATS_MAGIC`, then
//! one entry (a 32-bit little-endian length and a `stats_entry` message).
//! The message is decoded field by field here: `rust-criu` generates only
//! `rpc.proto`, and krg needs five numbers of this one.

use std::path::Path;
use std::time::Duration;

use protobuf::rt::WireType;
use protobuf::CodedInputStream;

/// `IMG_SERVICE_MAGIC` of criu/include/magic.h.
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// `STATS_MAGIC` of criu/include/magic.h.
const STATS_MAGIC: u32 = 0x5709_3306;
/// A stats file is under 100 bytes.
const STATS_BYTES_MAX: u64 = 4096;

/// From `dump_stats_entry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpStats {
    /// Time to freeze the tree.
    pub freezing_time: Duration,
    /// From frozen to killed or resumed: what the job feels, as far as the
    /// source is concerned (with lazy pages it lasts until the last page
    /// has left).
    pub frozen_time: Duration,
    pub memdump_time: Duration,
    pub memwrite_time: Duration,
    pub pages_scanned: u64,
    pub pages_written: u64,
    /// Pages left for the lazy-pages daemon to pull.
    pub pages_lazy: u64,
}

/// From `restore_stats_entry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreStats {
    pub forking_time: Duration,
    pub restore_time: Duration,
    pub pages_restored: u64,
}

/// Reads `stats-dump` from `work_dir`; `None` if absent or malformed.
pub fn read_dump(work_dir: &Path) -> Option<DumpStats> {
    let entry = read_entry(&work_dir.join("stats-dump"))?;
    let fields = fields(&entry, 1)?;
    let us = |n| Duration::from_micros(field(&fields, n));
    Some(DumpStats {
        freezing_time: us(1),
        frozen_time: us(2),
        memdump_time: us(3),
        memwrite_time: us(4),
        pages_scanned: field(&fields, 5),
        pages_written: field(&fields, 7),
        pages_lazy: field(&fields, 9),
    })
}

/// Reads `stats-restore` from `work_dir`; `None` if absent or malformed.
pub fn read_restore(work_dir: &Path) -> Option<RestoreStats> {
    let entry = read_entry(&work_dir.join("stats-restore"))?;
    let fields = fields(&entry, 2)?;
    Some(RestoreStats {
        forking_time: Duration::from_micros(field(&fields, 3)),
        restore_time: Duration::from_micros(field(&fields, 4)),
        pages_restored: field(&fields, 5),
    })
}

/// The `stats_entry` message of a stats file.
fn read_entry(path: &Path) -> Option<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(STATS_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    parse_image(&bytes)
}

fn parse_image(bytes: &[u8]) -> Option<Vec<u8>> {
    let word = |at: usize| -> Option<u32> {
        let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(u32::from_le_bytes(raw))
    };
    if bytes.len() as u64 > STATS_BYTES_MAX
        || word(0)? != IMG_SERVICE_MAGIC
        || word(4)? != STATS_MAGIC
    {
        return None;
    }
    let len = usize::try_from(word(8)?).ok()?;
    bytes.get(12..12 + len).map(<[u8]>::to_vec)
}

/// The varint fields (number, value) of the sub-message `which` of a
/// `stats_entry`.
fn fields(entry: &[u8], which: u32) -> Option<Vec<(u32, u64)>> {
    let mut outer = CodedInputStream::from_bytes(entry);
    while let Some(tag) = outer.read_raw_tag_or_eof().ok()? {
        let wire = WireType::new(tag & 7)?;
        if tag >> 3 == which && wire == WireType::LengthDelimited {
            let inner = outer.read_bytes().ok()?;
            return varints(&inner);
        }
        outer.skip_field(wire).ok()?;
    }
    None
}

fn varints(message: &[u8]) -> Option<Vec<(u32, u64)>> {
    let mut input = CodedInputStream::from_bytes(message);
    let mut out = Vec::new();
    while let Some(tag) = input.read_raw_tag_or_eof().ok()? {
        let wire = WireType::new(tag & 7)?;
        if wire == WireType::Varint {
            out.push((tag >> 3, input.read_raw_varint64().ok()?));
        } else {
            input.skip_field(wire).ok()?;
        }
    }
    Some(out)
}

fn field(fields: &[(u32, u64)], number: u32) -> u64 {
    fields
        .iter()
        .rev()
        .find(|(n, _)| *n == number)
        .map_or(0, |(_, v)| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `stats-dump` and `stats-restore` as CRIU 4.1.1 wrote them here.
    const DUMP: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x25, 0x00, 0x00, 0x00, 0x0a, 0x23, 0x08,
        0xf5, 0x01, 0x10, 0xb2, 0xf3, 0x01, 0x18, 0xcc, 0x10, 0x20, 0xaa, 0x09, 0x28, 0xc1, 0x06,
        0x30, 0x00, 0x38, 0xe9, 0x05, 0x40, 0x00, 0x48, 0x00, 0x50, 0x10, 0x58, 0x10, 0x60, 0x00,
        0x68, 0x00, 0x70, 0x00,
    ];
    const RESTORE: &[u8] = &[
        0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x0f, 0x00, 0x00, 0x00, 0x12, 0x0d, 0x08,
        0x00, 0x10, 0x00, 0x18, 0x9c, 0x02, 0x20, 0xaa, 0x72, 0x28, 0xe9, 0x05,
    ];

    #[test]
    fn decodes_criu_stats() {
        let entry = parse_image(DUMP).expect("a stats image");
        let f = fields(&entry, 1).expect("dump fields");
        assert_eq!(field(&f, 1), 245, "freezing_time us");
        assert_eq!(field(&f, 2), 31154, "frozen_time us");
        assert_eq!(field(&f, 7), 745, "pages_written");
        let entry = parse_image(RESTORE).expect("a stats image");
        let f = fields(&entry, 2).expect("restore fields");
        assert_eq!(field(&f, 3), 284, "forking_time us");
        assert_eq!(field(&f, 4), 14634, "restore_time us");
        assert_eq!(field(&f, 5), 745, "pages_restored");
        assert!(
            fields(&entry, 1).is_none(),
            "no dump entry in a restore file"
        );
    }

    #[test]
    fn refuses_other_files() {
        assert!(parse_image(b"not a criu image at all").is_none());
        assert!(parse_image(&DUMP[..20]).is_none(), "cut short");
        assert!(parse_image(&[]).is_none());
    }
}
