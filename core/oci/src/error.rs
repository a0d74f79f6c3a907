//! The one error table of the OCI API: every code with its HTTP status and message,
//! and the one serializer for the spec's error JSON.

use std::fmt;

use serde::Serialize;

macro_rules! error_codes {
    ($( $variant:ident => ($code:literal, $status:literal, $message:literal), )*) => {
        /// Every error code Berth answers with on the OCI API.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode { $( $variant, )* }

        impl ErrorCode {
            /// Every row of the table, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The spec's code string, e.g. `BLOB_UNKNOWN`.
            pub fn code(self) -> &'static str {
                match self { $( ErrorCode::$variant => $code, )* }
            }

            /// The default HTTP status for this code.
            pub fn status(self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )* }
            }

            /// The human-readable message.
            pub fn message(self) -> &'static str {
                match self { $( ErrorCode::$variant => $message, )* }
            }
        }
    };
}

error_codes! {
    BlobUnknown          => ("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    BlobUploadInvalid    => ("BLOB_UPLOAD_INVALID", 400, "blob upload invalid"),
    BlobUploadUnknown    => ("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"),
    DigestInvalid        => ("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ManifestBlobUnknown  => ("MANIFEST_BLOB_UNKNOWN", 400, "manifest references a manifest or blob unknown to registry"),
    ManifestInvalid      => ("MANIFEST_INVALID", 400, "manifest invalid"),
    ManifestUnknown      => ("MANIFEST_UNKNOWN", 404, "manifest unknown to registry"),
    NameInvalid          => ("NAME_INVALID", 400, "invalid repository name"),
    NameUnknown          => ("NAME_UNKNOWN", 404, "repository name not known to registry"),
    SizeInvalid          => ("SIZE_INVALID", 400, "provided length did not match content length"),
    Unauthorized         => ("UNAUTHORIZED", 401, "authentication required"),
    Denied               => ("DENIED", 403, "requested access to the resource is denied"),
    Unsupported          => ("UNSUPPORTED", 400, "the operation is unsupported"),
    TooManyRequests      => ("TOOMANYREQUESTS", 429, "too many requests"),
    RangeInvalid         => ("RANGE_INVALID", 416, "requested range not satisfiable"),
    PaginationInvalid    => ("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"),
    TagInvalid           => ("TAG_INVALID", 400, "manifest tag did not match URI"),
    Unavailable          => ("UNAVAILABLE", 503, "service unavailable"),
    // Management API (same JSON shape).
    InvalidRequest       => ("INVALID_REQUEST", 400, "the request is malformed"),
    NotFound             => ("NOT_FOUND", 404, "no such resource"),
    Conflict             => ("CONFLICT", 409, "the resource already exists"),
    Unknown              => ("UNKNOWN", 500, "unknown error"),
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// An error as answered on the wire: a code from the table, an optional detail,
/// and an optional status that overrides the code's default (for example
/// `BLOB_UPLOAD_INVALID` with 416 for an out-of-order chunk, or
/// `MANIFEST_INVALID` with 413 for an oversize manifest).
#[derive(Clone, Debug, PartialEq)]
pub struct RegistryError {
    code: ErrorCode,
    status: Option<u16>,
    detail: Option<serde_json::Value>,
}

impl RegistryError {
    pub fn new(code: ErrorCode) -> Self {
        RegistryError { code, status: None, detail: None }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(serde_json::Value::String(detail.into()));
        self
    }

    pub fn with_json_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.code.status())
    }

    pub fn detail(&self) -> Option<&serde_json::Value> {
        self.detail.as_ref()
    }

    /// The detail when it is a string, otherwise the code's message.
    pub fn detail_or_message(&self) -> String {
        match &self.detail {
            Some(serde_json::Value::String(s)) => s.clone(),
            _ => self.code.message().to_owned(),
        }
    }

    /// An internal failure: logged by the caller, answered as 500 `UNKNOWN`
    /// without leaking internals.
    pub fn internal() -> Self {
        RegistryError::new(ErrorCode::Unknown)
    }

    /// The spec error body: `{"errors":[{"code","message","detail"}]}`.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [Entry<'a>; 1],
        }
        #[derive(Serialize)]
        struct Entry<'a> {
            code: &'static str,
            message: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<&'a serde_json::Value>,
        }
        let body = Body { errors: [Entry { code: self.code.code(), message: self.code.message(), detail: self.detail.as_ref() }] };
        serde_json::to_vec(&body).expect("error body serializes")
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code.code(), self.status(), self.detail_or_message())
    }
}

impl std::error::Error for RegistryError {}

impl From<ErrorCode> for RegistryError {
    fn from(code: ErrorCode) -> Self {
        RegistryError::new(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.code()), "duplicate code {}", code.code());
            assert!(code.code().bytes().all(|b| b.is_ascii_uppercase() || b == b'_'));
            assert!((400..600).contains(&code.status()));
            assert!(!code.message().is_empty());
        }
        // Only server-side failures may be 5xx.
        for code in ErrorCode::ALL {
            if code.status() >= 500 {
                assert!(matches!(code, ErrorCode::Unknown | ErrorCode::Unavailable));
            }
        }
    }

    #[test]
    fn serializes_spec_json() {
        let e = RegistryError::new(ErrorCode::BlobUnknown).with_detail("sha256:abc");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v, serde_json::json!({"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry","detail":"sha256:abc"}]}));
        let e = RegistryError::new(ErrorCode::NameUnknown);
        assert_eq!(
            String::from_utf8(e.to_json()).unwrap(),
            r#"{"errors":[{"code":"NAME_UNKNOWN","message":"repository name not known to registry"}]}"#
        );
    }

    #[test]
    fn status_override() {
        let e = RegistryError::new(ErrorCode::ManifestInvalid).with_status(413);
        assert_eq!(e.status(), 413);
        assert_eq!(e.code().status(), 400);
    }
}
