//! Placeholders for multi-row statements on both backends.

use crate::db::Backend;

/// Placeholders for `n` rows of `width` values. SQLite gets anonymous `?`: it resolves each named
/// `$N` by a linear scan, which makes wide multi-row statements quadratic. Binds must then follow
/// the text's order, which they do when every placeholder of a statement comes from here.
pub(crate) fn value_rows(backend: Backend, n: usize, width: usize) -> String {
    let mut out = String::with_capacity(n * width * 5);
    for r in 0..n {
        out.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            if c > 0 {
                out.push_str(", ");
            }
            out.push_str(&placeholder(backend, 1 + r * width + c));
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

/// `($1, $2, …)` or `(?, ?, …)` for an `IN` list of `n` values.
pub(crate) fn in_list(backend: Backend, n: usize) -> String {
    in_list_from(backend, 1, n)
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

/// Split `items` into chunks whose lengths are powers of two (largest first, at most `max`), so
/// that a multi-row statement comes in a handful of texts that stay in the connection's prepared
/// statement cache instead of one text per batch size, each parsed and planned afresh.
pub(crate) fn pow2_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let max = max.max(1);
    let cap = if max.is_power_of_two() {
        max
    } else {
        max.next_power_of_two() / 2
    };
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let n = rest.len().min(cap);
        let n = if n.is_power_of_two() {
            n
        } else {
            n.next_power_of_two() / 2
        };
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        assert_eq!(value_rows(Backend::Postgres, 2, 2), "($1, $2), ($3, $4)");
        assert_eq!(value_rows(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(in_list_from(Backend::Postgres, 2, 3), "($2, $3, $4)");
        assert_eq!(in_list_from(Backend::Sqlite, 2, 2), "(?, ?)");
    }

    #[test]
    fn chunks_are_powers_of_two() {
        let v: Vec<u32> = (0..300).collect();
        let sizes: Vec<usize> = pow2_chunks(&v, 200).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [128, 128, 32, 8, 4]);
        let sizes: Vec<usize> = pow2_chunks(&v[..37], 64).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [32, 4, 1]);
        assert!(pow2_chunks::<u32>(&[], 64).is_empty());
        let joined: Vec<u32> = pow2_chunks(&v, 200).concat();
        assert_eq!(joined, v);
    }
}
