//! Errors in the files people write (service, node and proxy files),
//! located and explained: every error names the file, the line and
//! column, the field path (`readiness.interval`, `routes[1].host`), what
//! was expected and what was found, and for a misspelt field or value the
//! name that was probably meant. All of a file's errors are reported
//! together: after an error, the line that caused it is set aside (as a
//! comment, so every other line keeps its number) and the file is read
//! again, up to [`MAX_ERRORS`].

use std::fmt;

use serde::de::DeserializeOwned;

/// At most this many errors are reported for one file.
pub const MAX_ERRORS: usize = 20;

/// One problem in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based; 0 when the problem is not tied to a place in the file.
    pub line: usize,
    /// 1-based, in characters; 0 when unknown.
    pub col: usize,
    /// Dotted path of the field; empty for a syntax error.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        match (self.line, self.col) {
            (0, _) => {}
            (l, 0) => write!(f, ":{l}")?,
            (l, c) => write!(f, ":{l}:{c}")?,
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for Diagnostic {}

/// Every problem found in one file, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl Diagnostics {
    /// One problem of the whole file, tied to no line.
    pub fn of_file(file: &str, message: String) -> Diagnostics {
        Diagnostics(vec![Diagnostic { file: file.into(), line: 0, col: 0, field: String::new(), message }])
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorts by place in the file (errors not tied to a line last), keeping
    /// the order of errors on one line.
    pub fn sort(&mut self) {
        self.0.sort_by_key(|d| (d.line == 0, d.line, d.col));
    }
}

/// Finds fields of a TOML text by path, for errors found after parsing.
pub struct Locator<'a> {
    text: &'a str,
    doc: Option<toml_edit::ImDocument<&'a str>>,
}

#[derive(Debug, PartialEq)]
enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some((n, after)) = rest.split_once(']') {
            if let Ok(i) = n.parse() {
                out.push(Segment::Index(i));
            }
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    out
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        Locator { text, doc: toml_edit::ImDocument::parse(text).ok() }
    }

    /// 1-based line and column of byte `offset`.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let before = self.text.get(..offset.min(self.text.len())).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    /// Where the field at `path` is written (its key), or else its nearest
    /// enclosing table or item that is; `(0, 0)` when none is.
    pub fn at(&self, path: &str) -> (usize, usize) {
        self.span(path).map_or((0, 0), |s| self.position(s))
    }

    fn span(&self, path: &str) -> Option<usize> {
        use toml_edit::{Item, Value};
        let doc = self.doc.as_ref()?;
        let mut item: Item = doc.as_item().clone();
        let mut found = None;
        let mut keys: Vec<&str> = Vec::new();
        for seg in segments(path) {
            let next = match (&seg, &item) {
                (Segment::Key(k), _) => {
                    let Some((key, value)) = item.as_table_like().and_then(|t| t.get_key_value(k)) else {
                        return found;
                    };
                    found = key.span().map(|s| s.start).or(value.span().map(|s| s.start)).or(found);
                    keys.push(k);
                    value.clone()
                }
                (Segment::Index(i), Item::ArrayOfTables(a)) => {
                    let Some(t) = a.get(*i) else { return found };
                    found = t.span().map(|s| s.start).or_else(|| self.header(&keys.join("."), *i)).or(found);
                    Item::Table(t.clone())
                }
                (Segment::Index(i), Item::Value(Value::Array(a))) => {
                    let Some(v) = a.get(*i) else { return found };
                    found = v.span().map(|s| s.start).or(found);
                    Item::Value(v.clone())
                }
                _ => return found,
            };
            item = next;
        }
        found
    }

    /// Byte offset of the `index`-th `[[name]]` header.
    fn header(&self, name: &str, index: usize) -> Option<usize> {
        let want = format!("[[{name}]]");
        let mut offset = 0;
        let mut seen = 0;
        for line in self.text.split_inclusive('\n') {
            let t = line.trim();
            if t.replace(' ', "") == want {
                if seen == index {
                    return Some(offset + (line.len() - line.trim_start().len()));
                }
                seen += 1;
            }
            offset += line.len();
        }
        None
    }

    /// A diagnostic for `field`, placed where the field is written.
    pub fn diag(&self, file: &str, field: &str, message: impl Into<String>) -> Diagnostic {
        let (line, col) = self.at(field);
        Diagnostic { file: file.into(), line, col, field: field.into(), message: message.into() }
    }
}

/// Deserializes `text` into `T`, reporting every syntax error, type error
/// and unknown field at once (see the module's comment).
pub fn deserialize<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, Diagnostics> {
    let r = read(file, text);
    match r.value {
        Some(v) if r.errors.is_empty() => Ok(v),
        _ => Err(r.errors),
    }
}

/// What [`read`] made of a file.
#[derive(Debug)]
pub struct Read<T> {
    /// The file without the fields set aside, when the rest deserializes.
    pub value: Option<T>,
    pub errors: Diagnostics,
    /// Paths of the fields set aside for errors: a check of `value` should
    /// not report them again (they hold defaults now).
    pub set_aside: Vec<String>,
}

impl<T> Read<T> {
    /// Whether an error at `field` follows from one already reported.
    pub fn follows(&self, field: &str) -> bool {
        self.set_aside
            .iter()
            .any(|p| field == p || field.starts_with(&format!("{p}.")) || field.starts_with(&format!("{p}[")))
    }
}

/// [`deserialize`], keeping what could be read despite the errors.
pub fn read<T: DeserializeOwned>(file: &str, text: &str) -> Read<T> {
    let (value, errors, set_aside) = read_parts(file, text);
    Read { value, errors: Diagnostics(errors), set_aside }
}

fn read_parts<T: DeserializeOwned>(file: &str, text: &str) -> (Option<T>, Vec<Diagnostic>, Vec<String>) {
    // A good file (every stored record the view parses) is read once; the
    // passes below are for a file with errors.
    if let Ok(v) = toml::from_str(text) {
        return (Some(v), Vec::new(), Vec::new());
    }
    let mut out = Vec::new();
    let mut work = text.to_string();
    // Syntax first: each error's line is set aside and the rest read again.
    while out.len() < MAX_ERRORS {
        let Err(e) = work.parse::<toml::Table>() else { break };
        let loc = Locator { text: &work, doc: None };
        let (line, col) = e.span().map_or((0, 0), |s| loc.position(s.start));
        out.push(Diagnostic { file: file.into(), line, col, field: String::new(), message: explain(e.message()) });
        if line == 0 || !set_aside(&mut work, line, line) {
            return (None, out, Vec::new());
        }
    }
    // Then types and names, against the struct.
    let mut removed: Vec<String> = Vec::new();
    while out.len() < MAX_ERRORS {
        let result: Result<T, _> = serde_path_to_error::deserialize(toml::Deserializer::new(&work));
        let e = match result {
            Ok(v) => return (Some(v), out, removed),
            Err(e) => e,
        };
        let path = match e.path().to_string() {
            p if p == "." => String::new(),
            p => p,
        };
        let inner = e.into_inner();
        let message = inner.message().trim().to_string();
        // A required field set aside after an earlier error is missing
        // because of that error, not a second one.
        let missing = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`'));
        let artefact = missing.is_some_and(|m| {
            let full = if path.is_empty() { m.to_string() } else { format!("{path}.{m}") };
            removed.contains(&full)
        });
        // A missing field after an error may be that error's doing.
        let artefact = artefact || (missing.is_some() && !out.is_empty());
        if !artefact {
            let loc = Locator::new(&work);
            let (line, col) = match inner.span() {
                _ if missing.is_some() && path.is_empty() => (0, 0),
                Some(s) => loc.position(s.start),
                None => loc.at(&path),
            };
            out.push(Diagnostic { file: file.into(), line, col, field: path.clone(), message: explain(&message) });
        }
        // What to set aside: the span's lines, or for a whole table its
        // header through the line before the next header.
        let Some(span) = inner.span() else { break };
        let loc = Locator { text: &work, doc: None };
        let (first, _) = loc.position(span.start);
        let (mut last, _) = loc.position(span.end.saturating_sub(1).max(span.start));
        if work.lines().nth(first - 1).is_some_and(|l| l.trim_start().starts_with('[')) {
            last = work
                .lines()
                .enumerate()
                .skip(first)
                .find(|(_, l)| l.trim_start().starts_with('['))
                .map_or(work.lines().count(), |(i, _)| i);
        }
        if missing.is_some() || !set_aside(&mut work, first, last) {
            break;
        }
        // Setting a value aside must not break the file: if it does, what
        // follows would be errors of our making.
        if work.parse::<toml::Table>().is_err() {
            break;
        }
        removed.push(path);
    }
    (None, out, removed)
}

/// Comments out lines `first..=last` (1-based) of `text`; false when
/// there is nothing left to set aside.
fn set_aside(text: &mut String, first: usize, last: usize) -> bool {
    let mut changed = false;
    let lines: Vec<String> = text
        .split('\n')
        .enumerate()
        .map(|(i, l)| {
            if (first..=last).contains(&(i + 1)) && !l.trim_start().starts_with('#') && !l.trim().is_empty() {
                changed = true;
                format!("#{l}")
            } else {
                l.to_string()
            }
        })
        .collect();
    *text = lines.join("\n");
    changed
}

/// serde's and toml's messages, said for people: `invalid type: string
/// "three", expected u32` becomes `expected a whole number, found the
/// string "three"`; an unknown field or value says which was probably
/// meant and lists what is accepted.
pub fn explain(message: &str) -> String {
    let joined = message.trim().lines().map(str::trim).collect::<Vec<_>>().join("; ");
    let message = joined.as_str();
    for (prefix, what) in [("unknown field `", "field"), ("unknown variant `", "value")] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let Some((given, expected)) = rest.split_once('`') else { break };
            let accepted = backticked(expected);
            let mut out = format!("unknown {what} '{given}'");
            if let Some(near) = did_you_mean(given, &accepted) {
                out.push_str(&format!(" (did you mean '{near}'?)"));
            }
            if accepted.is_empty() {
                out.push_str(" (none is accepted here)");
            } else {
                out.push_str(&format!("; accepted: {}", accepted.join(", ")));
            }
            return out;
        }
    }
    if let Some(field) = message.strip_prefix("missing field `").and_then(|m| m.strip_suffix('`')) {
        return format!("the required field '{field}' is missing");
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((found, expected)) = rest.rsplit_once(", expected ") {
                return format!("expected {}, found {}", kind(expected), found.replace('`', ""));
            }
        }
    }
    message.to_string()
}

/// What serde calls a type, as a person would.
fn kind(expected: &str) -> String {
    let e = expected.trim();
    // The field's own range, if narrower, is checked and said after this.
    match e {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number, 0 or more".into(),
        "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "an array, as in [\"a\", \"b\"]".into(),
        "a map" => "a table".into(),
        "a string" => "a string (in quotes)".into(),
        e if e.starts_with("struct ") => "a table".into(),
        e => e.to_string(),
    }
}

fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// The accepted name closest to `given`, if one is close enough to be a
/// slip (at most a third of its letters differ).
pub fn did_you_mean<'a>(given: &str, accepted: &[&'a str]) -> Option<&'a str> {
    let g = given.to_ascii_lowercase();
    accepted
        .iter()
        .map(|a| (edit_distance(&g, &a.to_ascii_lowercase()), *a))
        .filter(|(d, a)| *d > 0 && *d <= (a.len().max(g.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

/// Levenshtein distance, with a swap of neighbours counted as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = v;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct File {
        name: String,
        replicas: Option<u32>,
        run: Run,
        #[serde(default)]
        routes: Vec<Route>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Run {
        command: String,
        #[serde(default)]
        args: Vec<String>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Route {
        host: Option<String>,
        path_prefix: Option<String>,
    }

    #[test]
    fn every_type_error_and_unknown_field_is_reported_with_its_place() {
        let text = "name = \"a\"\nreplicas = \"three\"\n[run]\ncommand = \"x\"\nargz = [\"1\"]\n[[routes]]\nhost = \"h\"\n[[routes]]\npath_prefx = \"/\"\n";
        let errs = deserialize::<File>("s.toml", text).unwrap_err().to_string();
        let lines: Vec<&str> = errs.lines().collect();
        assert_eq!(lines.len(), 3, "{errs}");
        assert_eq!(lines[0], "s.toml:2:12: replicas: expected a whole number, 0 or more, found string \"three\"");
        assert!(lines[1].starts_with("s.toml:5:1: run.argz: unknown field 'argz' (did you mean 'args'?)"), "{errs}");
        assert!(lines[1].ends_with("accepted: command, args"), "{errs}");
        assert!(
            lines[2].starts_with(
                "s.toml:9:1: routes[1].path_prefx: unknown field 'path_prefx' (did you mean 'path_prefix'?)"
            ),
            "{errs}"
        );
    }

    #[test]
    fn a_field_set_aside_is_not_reported_missing_too() {
        let errs = deserialize::<File>("s.toml", "name = \"a\"\n[run]\ncommand = 3\n").unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].field, "run.command");
        let errs = deserialize::<File>("s.toml", "name = \"a\"\n").unwrap_err();
        assert_eq!(errs.to_string(), "s.toml: the required field 'run' is missing");
    }

    #[test]
    fn several_syntax_errors_are_reported() {
        let errs = deserialize::<File>("s.toml", "name = \"a\nreplicas = 3\n[run]\ncommand = = 1\n").unwrap_err();
        assert_eq!(errs.0.len(), 2, "{errs}");
        assert_eq!((errs.0[0].line, errs.0[1].line), (1, 4), "{errs}");
    }

    #[test]
    fn fields_are_located_by_path() {
        let text = "name = \"a\"\n[run]\ncommand = \"x\"\nargs = [\"a\",\n  \"b\"]\n[[routes]]\nhost = \"h\"\n[[routes]]\n  host = \"i\"\n";
        let l = Locator::new(text);
        assert_eq!(l.at("name"), (1, 1));
        assert_eq!(l.at("run.command"), (3, 1));
        assert_eq!(l.at("run.args[1]"), (5, 3));
        assert_eq!(l.at("routes[1].host"), (9, 3));
        // A field not written: its table.
        assert_eq!(l.at("routes[1].path_prefix"), l.at("routes[1]"));
        assert_eq!(l.at("routes[1]"), (8, 1), "{:?}", segments("routes[1]"));
        assert_eq!(l.at("nothing.here"), (0, 0));
    }

    #[test]
    fn near_misses_are_suggested_and_far_ones_are_not() {
        assert_eq!(did_you_mean("replica", &["name", "replicas"]), Some("replicas"));
        assert_eq!(did_you_mean("raedy", &["ready", "run"]), Some("ready"));
        assert_eq!(did_you_mean("zzz", &["name", "replicas"]), None);
    }
}
