//! How the CLI prints what it reads: `-o table` (aligned columns, the
//! default), `-o wide` (more columns), `-o json` or `-o yaml` (the view the
//! API serves, whole, for scripts).

use std::io::Write;

use comfy_table::presets::NOTHING;
use comfy_table::Table;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(clap::Args, Clone, Debug, Default)]
pub struct Output {
    /// How to print: table, wide (more columns), json or yaml.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The same as `-o json`.
    #[arg(long, hide = true)]
    json: bool,
}

impl Output {
    pub fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else {
            self.format
        }
    }

    /// Prints `value` as JSON or YAML, or what `text` makes of it (told
    /// whether wide columns were asked for).
    pub fn print<T: Serialize>(&self, value: &T, text: impl FnOnce(bool) -> String) -> anyhow::Result<()> {
        let out = match self.format() {
            Format::Table => text(false),
            Format::Wide => text(true),
            Format::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
            Format::Yaml => yaml(&serde_json::to_value(value)?),
        };
        // A closed pipe (`halo status | head`) is not an error worth a panic.
        let _ = std::io::stdout().write_all(out.as_bytes());
        Ok(())
    }
}

/// A table in the house style: a header of capitals, columns two spaces
/// apart, no borders (as kubectl and nomad print).
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(NOTHING);
    t.set_header(header.to_vec());
    t
}

/// The table as text, each line indented by `indent` spaces.
pub fn render(mut t: Table, indent: usize) -> String {
    for c in t.column_iter_mut() {
        c.set_padding((0, 2));
    }
    let pad = " ".repeat(indent);
    t.lines().map(|l| format!("{pad}{}\n", l.trim_end())).collect()
}

/// `value` as a YAML document (block style; strings quoted when YAML
/// would read them as something else).
pub fn yaml(value: &serde_json::Value) -> String {
    let mut out = String::new();
    yaml_into(value, 0, &mut out);
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

fn yaml_into(v: &serde_json::Value, indent: usize, out: &mut String) {
    use serde_json::Value;
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                out.push_str(&format!("{pad}{}:", scalar_str(k)));
                block_or_inline(v, indent, out);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for v in a {
                let mut item = String::new();
                yaml_into(v, indent + 2, &mut item);
                if is_block(v) {
                    // The item's first line follows the dash.
                    out.push_str(&format!("{pad}- {}", &item[indent + 2..]));
                } else {
                    out.push_str(&format!("{pad}- {}", item.trim_start()));
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&inline(other));
            out.push('\n');
        }
    }
}

fn block_or_inline(v: &serde_json::Value, indent: usize, out: &mut String) {
    if is_block(v) {
        out.push('\n');
        // Sequences in a map sit at the map's own indent, as kubectl prints.
        let child = if v.is_array() { indent } else { indent + 2 };
        yaml_into(v, child, out);
    } else {
        out.push(' ');
        out.push_str(&inline(v));
        out.push('\n');
    }
}

fn is_block(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Object(m) => !m.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn inline(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => scalar_str(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// A string as a YAML scalar: bare when it cannot be read as anything but
/// that string, else double-quoted (JSON's escapes are YAML's).
fn scalar_str(s: &str) -> String {
    const WORDS: [&str; 12] = ["true", "false", "null", "yes", "no", "on", "off", "y", "n", "~", ".nan", ".inf"];
    let plain = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-./@".contains(c))
        && !s.starts_with(['-', '.', '@'])
        && !WORDS.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err();
    if plain {
        s.to_string()
    } else {
        serde_json::Value::String(s.to_string()).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style_and_quotes_what_would_be_misread() {
        let v = serde_json::json!({
            "name": "web",
            "replicas": 3,
            "port": "8080",
            "on": "yes",
            "empty": [],
            "instances": [{ "id": "web-1", "ready": true, "exit": null }, { "id": "web-2", "ready": false }],
            "tags": ["a b", "c"],
            "nested": { "x": { "y": 1 } },
        });
        let y = yaml(&v);
        // Keys sorted, as kubectl prints them.
        let want = "empty: []\ninstances:\n- exit: null\n  id: web-1\n  ready: true\n- id: web-2\n  ready: false\nname: web\nnested:\n  x:\n    \"y\": 1\n\"on\": \"yes\"\nport: \"8080\"\nreplicas: 3\ntags:\n- \"a b\"\n- c\n";
        assert_eq!(y, want, "\n{y}");
    }

    #[test]
    fn tables_align_columns_without_trailing_space() {
        let mut t = table(&["NAME", "STATE"]);
        t.add_row(vec!["a-long-name", "running"]);
        t.add_row(vec!["b", "-"]);
        assert_eq!(render(t, 2), "  NAME         STATE\n  a-long-name  running\n  b            -\n");
    }
}
