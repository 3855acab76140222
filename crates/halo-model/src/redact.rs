//! A service file as a read-only reader may see it: every `[run.env]`
//! value (passwords, keys) replaced, names and everything else kept as
//! written. Only the admin token (and backups) see the values.

/// What stands in for a redacted value.
pub const REDACTED: &str = "\"(redacted)\"";

/// `text` with the values of `run.env` replaced by [`REDACTED`]. A file
/// that does not parse (never one the store holds) is withheld whole.
pub fn redact_env(text: &str) -> String {
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return "# (withheld: the stored file could not be read to redact its secrets)\n".into();
    };
    let env = doc.get("run").and_then(|r| r.as_table_like()).and_then(|r| r.get("env"));
    let Some(env) = env.and_then(|e| e.as_table_like()) else { return text.to_string() };
    let mut spans: Vec<std::ops::Range<usize>> = env.iter().filter_map(|(_, v)| v.span()).collect();
    spans.sort_by_key(|s| std::cmp::Reverse(s.start));
    let mut out = text.to_string();
    for s in spans {
        out.replace_range(s, REDACTED);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_go_and_names_stay_in_every_spelling() {
        let table = "name = \"db\"\n[run]\ncommand = \"x\"\n[run.env]\nPASSWORD = \"hunter2\" # set\nUSER = 'admin'\n";
        let got = redact_env(table);
        assert_eq!(got, "name = \"db\"\n[run]\ncommand = \"x\"\n[run.env]\nPASSWORD = \"(redacted)\" # set\nUSER = \"(redacted)\"\n");
        let inline = "name = \"db\"\n[run]\ncommand = \"x\"\nenv = { PASSWORD = \"\"\"hunter2\"\"\", B = \"c\" }\n";
        let got = redact_env(inline);
        assert!(!got.contains("hunter2") && got.contains("PASSWORD") && got.contains("B = \"(redacted)\""), "{got}");
        let dotted = "name = \"db\"\nrun.command = \"x\"\nrun.env.PASSWORD = \"hunter2\"\n";
        let got = redact_env(dotted);
        assert!(!got.contains("hunter2") && got.contains("run.env.PASSWORD"), "{got}");
        for got in [&redact_env(table), &redact_env(inline), &redact_env(dotted)] {
            assert!(crate::parse_service("x", got).is_ok(), "the redacted file still reads: {got}");
        }
        let none = "name = \"web\"\n[run]\ncommand = \"x\"\n";
        assert_eq!(redact_env(none), none);
    }
}
