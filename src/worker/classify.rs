//! One place that decides what a failed flush means: retry it
//! (transient, or a schema problem an operator must fix), or quarantine the
//! record (permanent), and which `error_type` label it counts under.

use std::io;

use deadpool_postgres::PoolError;

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database is away, busy or conflicted: retry with backoff, forever.
    Transient,
    /// The data itself is refused (SQLSTATE classes 21 cardinality, 22
    /// data, 23 integrity, 54 program limit, e.g. an index row too large):
    /// isolate and quarantine the failing records.
    Permanent,
    /// The schema does not fit (class 42, e.g. a missing column): retry
    /// with backoff, never dead-letter; an operator must fix the schema.
    Schema,
}

/// A failure, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// What to do.
    pub class: ErrorClass,
    /// The `error_type` label of `outbox_persist_failures_total`.
    pub error_type: &'static str,
    /// The SQLSTATE, when the database sent one.
    pub sqlstate: Option<String>,
    /// Whether the error matched no known case (treated as transient and
    /// logged loudly).
    pub unknown: bool,
}

impl Classified {
    fn new(class: ErrorClass, error_type: &'static str, sqlstate: Option<String>) -> Self {
        Self { class, error_type, sqlstate, unknown: false }
    }
}

/// Classifies an SQLSTATE.
pub fn classify_sqlstate(code: &str) -> Classified {
    use ErrorClass::*;
    let sqlstate = Some(code.to_owned());
    let (class, error_type) = match code {
        "40001" | "40P01" => (Transient, "conflict"),
        "57014" => (Transient, "timeout"),
        "57P01" | "57P02" | "57P03" => (Transient, "connection"),
        "53300" => (Transient, "connection"),
        _ if code.starts_with("08") => (Transient, "connection"),
        _ if code.starts_with("53") => (Transient, "other"),
        _ if code.starts_with("22") => (Permanent, "data"),
        _ if code.starts_with("23") => (Permanent, "constraint"),
        // A row the database cannot take (too large for an index, too many
        // columns), or a command affecting a row twice: the data, not the
        // database, must change.
        _ if code.starts_with("54") => (Permanent, "data"),
        _ if code.starts_with("21") => (Permanent, "data"),
        // Not enough memory or disk, or the server in trouble: it may pass.
        _ if code.starts_with("58") || code.starts_with("55") || code.starts_with("25") => (Transient, "other"),
        _ if code.starts_with("42") => (Schema, "schema"),
        _ => return Classified { class: Transient, error_type: "other", sqlstate, unknown: true },
    };
    Classified::new(class, error_type, sqlstate)
}

/// Classifies a database error: by SQLSTATE when the server sent one,
/// otherwise as a connection problem (refused, reset, closed) or a timeout.
pub fn classify_postgres(error: &tokio_postgres::Error) -> Classified {
    if let Some(code) = error.code() {
        return classify_sqlstate(code.code());
    }
    if error.is_closed() {
        return Classified::new(ErrorClass::Transient, "connection", None);
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<io::Error>() {
            let error_type = if io.kind() == io::ErrorKind::TimedOut { "timeout" } else { "connection" };
            return Classified::new(ErrorClass::Transient, error_type, None);
        }
        source = cause.source();
    }
    let text = error.to_string();
    if text.contains("timeout") || text.contains("timed out") {
        return Classified::new(ErrorClass::Transient, "timeout", None);
    }
    // Connection set-up failures without an io cause (e.g. the server
    // closing during start-up) are still connection problems.
    if text.contains("connection") || text.contains("connect") {
        return Classified::new(ErrorClass::Transient, "connection", None);
    }
    Classified { class: ErrorClass::Transient, error_type: "other", sqlstate: None, unknown: true }
}

/// Classifies a failure to get a pooled connection.
pub fn classify_pool(error: &PoolError) -> Classified {
    match error {
        PoolError::Timeout(_) => Classified::new(ErrorClass::Transient, "timeout", None),
        PoolError::Backend(e) => classify_postgres(e),
        PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
            Classified::new(ErrorClass::Transient, "connection", None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_classes_and_labels() {
        for (code, class, label) in [
            ("08006", ErrorClass::Transient, "connection"),
            ("08001", ErrorClass::Transient, "connection"),
            ("40001", ErrorClass::Transient, "conflict"),
            ("40P01", ErrorClass::Transient, "conflict"),
            ("53300", ErrorClass::Transient, "connection"),
            ("53100", ErrorClass::Transient, "other"),
            ("57P01", ErrorClass::Transient, "connection"),
            ("57P03", ErrorClass::Transient, "connection"),
            ("57014", ErrorClass::Transient, "timeout"),
            ("22001", ErrorClass::Permanent, "data"),
            ("22P02", ErrorClass::Permanent, "data"),
            ("23505", ErrorClass::Permanent, "constraint"),
            ("23514", ErrorClass::Permanent, "constraint"),
            ("42703", ErrorClass::Schema, "schema"),
            ("42P01", ErrorClass::Schema, "schema"),
            ("54000", ErrorClass::Permanent, "data"),
            ("54001", ErrorClass::Permanent, "data"),
            ("21000", ErrorClass::Permanent, "data"),
            ("55P03", ErrorClass::Transient, "other"),
            ("58030", ErrorClass::Transient, "other"),
        ] {
            let classified = classify_sqlstate(code);
            assert_eq!((classified.class, classified.error_type), (class, label), "{code}");
            assert!(!classified.unknown, "{code}");
            assert_eq!(classified.sqlstate.as_deref(), Some(code));
        }
    }

    #[test]
    fn unknown_sqlstates_are_transient_and_flagged() {
        let classified = classify_sqlstate("XX000");
        assert_eq!(classified.class, ErrorClass::Transient);
        assert_eq!(classified.error_type, "other");
        assert!(classified.unknown);
    }

    #[test]
    fn every_label_is_one_of_the_metric_set() {
        for code in ["08006", "40001", "53300", "53100", "57014", "22001", "23505", "42703", "XX000"] {
            assert!(crate::metrics::ERROR_TYPES.contains(&classify_sqlstate(code).error_type));
        }
    }
}
