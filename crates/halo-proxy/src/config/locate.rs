//! Finds the line of a table, array item or key in TOML text, so that
//! validation errors can point at the line to fix. Table headers are
//! indexed once, so a lookup costs no scan of the file (a file of 1,000
//! routes and 1,000 upstreams asks for 2,000 of them on every reload).

use std::collections::HashMap;

pub struct Locator<'a> {
    lines: Vec<&'a str>,
    /// Header (`[name]` or `[[name]]`, trimmed) -> its lines, 1-based, in order.
    headers: HashMap<&'a str, Vec<usize>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        let lines: Vec<&str> = text.lines().collect();
        let mut headers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim();
            if t.starts_with('[') && t.ends_with(']') {
                headers.entry(t).or_default().push(i + 1);
            }
        }
        Locator { lines, headers }
    }

    /// Line of `[name]`, or 0.
    pub fn table(&self, name: &str) -> usize {
        self.headers.get(format!("[{name}]").as_str()).and_then(|v| v.first().copied()).unwrap_or(0)
    }

    /// Line of the `index`-th `[[name]]`, or 0.
    pub fn array_item(&self, name: &str, index: usize) -> usize {
        self.headers.get(format!("[[{name}]]").as_str()).and_then(|v| v.get(index).copied()).unwrap_or(0)
    }

    /// Line of `key = ...` in the table starting at `table_line`, or
    /// `table_line` itself when the key is not there.
    pub fn key(&self, table_line: usize, key: &str) -> usize {
        for (i, l) in self.lines.iter().enumerate().skip(table_line) {
            let t = l.trim_start();
            if t.starts_with('[') && i + 1 > table_line {
                break;
            }
            if let Some(rest) = t.strip_prefix(key) {
                if rest.trim_start().starts_with('=') {
                    return i + 1;
                }
            }
        }
        table_line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_items_and_keys_are_found_by_line() {
        let text = "[proxy]\nworkers = 2\n[[routes]]\nname = \"a\"\n  [[routes]]\nname = \"b\"\nupstream = \"u\"\n[upstreams.u]\n";
        let l = Locator::new(text);
        assert_eq!((l.table("proxy"), l.table("upstreams.u"), l.table("admin")), (1, 8, 0));
        assert_eq!((l.array_item("routes", 0), l.array_item("routes", 1), l.array_item("routes", 2)), (3, 5, 0));
        assert_eq!((l.key(5, "upstream"), l.key(3, "upstream"), l.key(1, "workers")), (7, 3, 2));
    }
}
