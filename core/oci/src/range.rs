//! Byte ranges: the `Range` request header on blob GET and the `Content-Range`
//! header on chunked upload PATCH.

use crate::error::{ErrorCode, RegistryError};

/// An inclusive byte range `start..=end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

impl ByteRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

fn unsatisfiable(detail: String) -> RegistryError {
    RegistryError::new(ErrorCode::RangeInvalid).with_detail(detail)
}

/// Parse a `Range` request header against a blob of `size` bytes.
///
/// `Ok(None)` means "serve the whole blob": the unit is not `bytes` or several
/// ranges were asked for (both may be ignored per RFC 9110). A malformed or
/// unsatisfiable single byte range is a 416 `RANGE_INVALID`.
pub fn parse_range(header: &str, size: u64) -> Result<Option<ByteRange>, RegistryError> {
    let header = header.trim();
    let Some(spec) = header.strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.trim().split_once('-').ok_or_else(|| unsatisfiable(format!("malformed range {header:?}")))?;
    let num = |s: &str| -> Result<u64, RegistryError> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return Err(unsatisfiable(format!("malformed range {header:?}")));
        }
        s.parse().map_err(|_| unsatisfiable(format!("malformed range {header:?}")))
    };
    let range = match (a.is_empty(), b.is_empty()) {
        (true, true) => return Err(unsatisfiable(format!("malformed range {header:?}"))),
        // Suffix range: the last N bytes.
        (true, false) => {
            let n = num(b)?;
            if n == 0 || size == 0 {
                return Err(unsatisfiable(format!("range {header:?} not satisfiable for size {size}")));
            }
            ByteRange { start: size.saturating_sub(n), end: size - 1 }
        }
        (false, true) => {
            let start = num(a)?;
            if start >= size {
                return Err(unsatisfiable(format!("range {header:?} not satisfiable for size {size}")));
            }
            ByteRange { start, end: size - 1 }
        }
        (false, false) => {
            let (start, end) = (num(a)?, num(b)?);
            if start > end {
                return Err(unsatisfiable(format!("malformed range {header:?}")));
            }
            if start >= size {
                return Err(unsatisfiable(format!("range {header:?} not satisfiable for size {size}")));
            }
            ByteRange { start, end: end.min(size - 1) }
        }
    };
    Ok(Some(range))
}

/// Parse the `Content-Range` of an upload chunk: `<start>-<end>` as the spec writes
/// it, also accepting the RFC form `bytes <start>-<end>/<total|*>`.
pub fn parse_content_range(header: &str) -> Result<ByteRange, RegistryError> {
    let bad =
        || RegistryError::new(ErrorCode::BlobUploadInvalid).with_status(416).with_detail(format!("malformed Content-Range {header:?}"));
    let mut s = header.trim();
    if let Some(rest) = s.strip_prefix("bytes ").or_else(|| s.strip_prefix("bytes=")) {
        s = rest.split('/').next().unwrap_or("").trim();
    }
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let num = |x: &str| -> Result<u64, RegistryError> {
        if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        x.parse().map_err(|_| bad())
    };
    let (start, end) = (num(a)?, num(b)?);
    if end < start {
        return Err(bad());
    }
    Ok(ByteRange { start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> Option<ByteRange> {
        Some(ByteRange { start, end })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100).unwrap(), r(0, 9));
        assert_eq!(parse_range("bytes=90-", 100).unwrap(), r(90, 99));
        assert_eq!(parse_range("bytes=-10", 100).unwrap(), r(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100).unwrap(), r(0, 99));
        assert_eq!(parse_range("bytes=50-1000", 100).unwrap(), r(50, 99));
        assert_eq!(parse_range("items=0-1", 100).unwrap(), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100).unwrap(), None);
        for bad in ["bytes=100-", "bytes=100-200", "bytes=-0", "bytes=5-1", "bytes=x-1", "bytes=-", "bytes=1", "bytes=+1-2"] {
            let e = parse_range(bad, 100).unwrap_err();
            assert_eq!(e.code(), ErrorCode::RangeInvalid, "{bad}");
            assert_eq!(e.status(), 416);
        }
        assert!(parse_range("bytes=0-0", 0).is_err());
        assert!(parse_range("bytes=99999999999999999999999-", 10).is_err());
    }

    #[test]
    fn content_ranges() {
        assert_eq!(parse_content_range("0-1023").unwrap(), ByteRange { start: 0, end: 1023 });
        assert_eq!(parse_content_range("bytes 10-19/*").unwrap(), ByteRange { start: 10, end: 19 });
        assert_eq!(parse_content_range("bytes=10-19").unwrap(), ByteRange { start: 10, end: 19 });
        for bad in ["", "5", "5-", "-5", "9-3", "a-b", "1-2-3"] {
            assert_eq!(parse_content_range(bad).unwrap_err().code(), ErrorCode::BlobUploadInvalid, "{bad}");
        }
    }
}
