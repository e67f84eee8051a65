//! Placeholders for multi-row statements on both backends.

use crate::db::Backend;

/// Placeholders for `n` rows of `width` values. SQLite gets anonymous `?`: it resolves each named
/// `$N` by a linear scan, which makes wide multi-row statements quadratic. Binds must then follow
/// the text's order, which they do when every placeholder of a statement comes from here.
pub(crate) fn value_rows(backend: Backend, n: usize, width: usize) -> String {
    value_rows_from(backend, 1, n, width)
}

/// As [`value_rows`], numbering PostgreSQL's placeholders from `first`.
pub(crate) fn value_rows_from(backend: Backend, first: usize, n: usize, width: usize) -> String {
    let mut out = String::with_capacity(n * width * 5);
    for r in 0..n {
        out.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            if c > 0 {
                out.push_str(", ");
            }
            match backend {
                Backend::Sqlite => out.push('?'),
                Backend::Postgres => out.push_str(&format!("${}", first + r * width + c)),
            }
        }
        out.push(')');
    }
    out
}

/// The `n`th (1-based) placeholder.
pub(crate) fn placeholder(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Sqlite => "?".to_owned(),
        Backend::Postgres => format!("${n}"),
    }
}

/// `($first, …)` or `(?, ?, …)` for an `IN` list of `n` values.
pub(crate) fn in_list_from(backend: Backend, first: usize, n: usize) -> String {
    let mut out = String::from("(");
    for i in 0..n {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&placeholder(backend, first + i));
    }
    out.push(')');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert_eq!(value_rows(Backend::Postgres, 2, 2), "($1, $2), ($3, $4)");
        assert_eq!(value_rows(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(value_rows_from(Backend::Postgres, 3, 1, 2), "($3, $4)");
        assert_eq!(in_list_from(Backend::Postgres, 2, 3), "($2, $3, $4)");
        assert_eq!(in_list_from(Backend::Sqlite, 2, 2), "(?, ?)");
    }
}
