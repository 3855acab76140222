//! Finds the line of a table, array item or key in TOML text, so that
//! validation errors can point at the line to fix.

pub struct Locator<'a> {
    lines: Vec<&'a str>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        Locator { lines: text.lines().collect() }
    }

    /// Line of `[name]`, or 0.
    pub fn table(&self, name: &str) -> usize {
        let header = format!("[{name}]");
        self.find(0, |l| l == header)
    }

    /// Line of the `index`-th `[[name]]`, or 0.
    pub fn array_item(&self, name: &str, index: usize) -> usize {
        let header = format!("[[{name}]]");
        let mut seen = 0;
        for (i, l) in self.lines.iter().enumerate() {
            if l.trim() == header {
                if seen == index {
                    return i + 1;
                }
                seen += 1;
            }
        }
        0
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

    fn find(&self, from: usize, pred: impl Fn(&str) -> bool) -> usize {
        self.lines.iter().enumerate().skip(from).find(|(_, l)| pred(l.trim())).map_or(0, |(i, _)| i + 1)
    }
}
