//! Which of halo's files a text is, told by its top-level keys, so that a
//! file given to the wrong command is named for what it is.

/// The kinds of file halo reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `name`, `[run]`: `halo apply -f`.
    Service,
    /// `[node]`, `[[services]]`, `[[vip]]`, `[backup]`: `halo up -c`, `halo agent -c`.
    Node,
    /// `[proxy]`, `[[listeners]]`, `[upstreams]`, `[admin]`: `halo proxy -c`.
    Proxy,
}

const NODE_KEYS: [&str; 4] = ["node", "services", "vip", "backup"];
const PROXY_KEYS: [&str; 4] = ["proxy", "listeners", "upstreams", "admin"];

impl FileKind {
    /// The kind `text` is, or `None` when it has none of the keys that tell
    /// (or does not parse).
    pub fn of(text: &str) -> Option<FileKind> {
        let table = text.parse::<toml::Table>().ok()?;
        let has = |k: &str| table.contains_key(k);
        if has("run") || has("name") {
            Some(FileKind::Service)
        } else if NODE_KEYS.iter().any(|k| has(k)) {
            Some(FileKind::Node)
        } else if PROXY_KEYS.iter().any(|k| has(k)) {
            Some(FileKind::Proxy)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FileKind::Service => "a service file",
            FileKind::Node => "a node file",
            FileKind::Proxy => "a proxy file",
        }
    }

    /// The commands that take this kind of file.
    pub fn commands(self) -> &'static str {
        match self {
            FileKind::Service => "`halo apply -f FILE`",
            FileKind::Node => "`halo up -c FILE` or `halo agent -c FILE`",
            FileKind::Proxy => "`halo proxy -c FILE`",
        }
    }

    /// What to say when `text`, read where `wanted` is, is another kind
    /// of file; `None` when it is not.
    pub fn misfiled(text: &str, wanted: FileKind) -> Option<String> {
        let kind = FileKind::of(text).filter(|k| *k != wanted)?;
        let table = text.parse::<toml::Table>().ok()?;
        let telling: &[&str] = match kind {
            FileKind::Service => &["name", "run"],
            FileKind::Node => &NODE_KEYS,
            FileKind::Proxy => &PROXY_KEYS,
        };
        let found: Vec<String> = telling
            .iter()
            .filter_map(|k| match table.get(*k)? {
                toml::Value::Table(_) => Some(format!("[{k}]")),
                toml::Value::Array(a) if a.iter().all(toml::Value::is_table) => Some(format!("[[{k}]]")),
                _ => Some(k.to_string()),
            })
            .collect();
        Some(format!(
            "this is {} (it has {}), which {} reads; this command takes {}",
            kind.name(),
            found.join(" and "),
            kind.commands(),
            wanted.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_told_by_their_keys() {
        assert_eq!(FileKind::of("name = \"a\"\n[run]\ncommand = \"x\"\n"), Some(FileKind::Service));
        assert_eq!(FileKind::of("[node]\napi = \"127.0.0.1:7070\"\n"), Some(FileKind::Node));
        assert_eq!(FileKind::of("[[listeners]]\nname = \"l\"\n[[services]]\nname = \"s\"\n"), Some(FileKind::Node));
        assert_eq!(FileKind::of("[[listeners]]\nname = \"l\"\nlisten = \"127.0.0.1:1\"\n"), Some(FileKind::Proxy));
        assert_eq!(FileKind::of("x = 1\n"), None);
        assert_eq!(FileKind::of("x = \n"), None);
        let m = FileKind::misfiled("[node]\n[[services]]\nname = \"a\"\n", FileKind::Service).unwrap();
        assert!(m.starts_with("this is a node file (it has [node] and [[services]]), which `halo up"), "{m}");
        assert_eq!(FileKind::misfiled("[node]\n", FileKind::Node), None);
    }
}
