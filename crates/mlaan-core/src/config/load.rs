//! Loading a config: defaults, then a file or a recipe, then each command-line `key=value`,
//! then validation. A syntax, key or type error is blamed on the input that brought it (the
//! file with its line, the recipe, or the one command-line setting).

use super::RunConfig;
use crate::error::ConfigError;
use crate::recipe::Recipe;
use std::path::Path;

/// Set `dotted.key = value` in a TOML table; `value` is parsed as TOML, or taken as a string.
pub fn set_dotted(table: &mut toml::Table, arg: &str) -> Result<(), ConfigError> {
    let err = |reason: &str| ConfigError::Override { arg: arg.to_string(), reason: reason.into() };
    let (key, raw) = arg.split_once('=').ok_or_else(|| err("expected section.key=value"))?;
    let key = key.trim();
    let raw = raw.trim();
    let value = parse_value(raw);
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err("empty key"));
    }
    let mut t = table;
    for p in &parts[..parts.len() - 1] {
        let entry =
            t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry.as_table_mut().ok_or_else(|| err(&format!("`{p}` is not a section")))?;
    }
    t.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

/// The typed config of a TOML table.
fn typed(table: &toml::Table) -> Result<RunConfig, toml::de::Error> {
    toml::Value::Table(table.clone()).try_into()
}

/// A key or type error of `origin`, in the words of a config rather than of serde.
fn schema_error(origin: String, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace("unknown field", "unknown key");
    ConfigError::Schema { origin, message }
}

/// The TOML table of a config's text; a syntax, key or type error names `origin` (a file or a
/// recipe) and the line.
fn parse_config(text: &str, origin: &str) -> Result<toml::Table, ConfigError> {
    let table = text
        .parse::<toml::Table>()
        .map_err(|e| ConfigError::Parse { origin: origin.into(), message: e.to_string() })?;
    toml::from_str::<RunConfig>(text).map_err(|e| {
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        let at = line.map_or(String::new(), |l| format!(", line {l}"));
        schema_error(format!("{origin}{at}"), &e)
    })?;
    Ok(table)
}

fn parse_value(raw: &str) -> toml::Value {
    // Parse as a TOML value by wrapping it in a one-key document; bare words become strings.
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Where a config starts from, before the command line's settings go on top.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource<'a> {
    /// The built-in defaults alone.
    Defaults,
    /// A config file (`--config`).
    File(&'a Path),
    /// A dataset's recipe: a shipped config compiled into the binary.
    Recipe(&'static Recipe),
}

impl std::fmt::Display for ConfigSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Defaults => f.write_str("built-in defaults"),
            ConfigSource::File(p) => write!(f, "config file {}", p.display()),
            ConfigSource::Recipe(r) => write!(f, "{r}"),
        }
    }
}

impl RunConfig {
    /// Build the config: defaults, then `file`, then each `key=value` of `overrides` in order.
    /// An unknown key or a value of the wrong type is blamed on the input that brought it:
    /// the file (with its line) or the one override.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        RunConfig::load_from(file.map_or(ConfigSource::Defaults, ConfigSource::File), overrides)
    }

    /// A recipe with `overrides` on top.
    pub fn from_recipe(
        recipe: &'static Recipe,
        overrides: &[String],
    ) -> Result<RunConfig, ConfigError> {
        RunConfig::load_from(ConfigSource::Recipe(recipe), overrides)
    }

    /// Defaults, then what `source` says, then each `key=value` of `overrides` in order.
    pub fn load_from(source: ConfigSource, overrides: &[String]) -> Result<RunConfig, ConfigError> {
        let mut table = match source {
            ConfigSource::Defaults => toml::Table::new(),
            ConfigSource::File(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                parse_config(&text, &format!("config file {}", path.display()))?
            }
            ConfigSource::Recipe(r) => parse_config(r.text, &format!("recipe {}", r.file))?,
        };
        for o in overrides {
            set_dotted(&mut table, o)?;
            typed(&table).map_err(|e| schema_error(format!("command-line setting `{o}`"), &e))?;
        }
        let cfg = typed(&table).map_err(|e| schema_error("config".into(), &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The resolved config as TOML, for the run directory.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Test helper: `text` as a config file (each call its own file), with `overrides` on top.
#[cfg(test)]
pub(super) fn load_text(text: &str, overrides: &[&str]) -> Result<RunConfig, ConfigError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("mlaan-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("c{}.toml", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).unwrap();
    let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    RunConfig::load(Some(&path), &o)
}

#[cfg(test)]
mod tests {
    use super::load_text as load;
    use super::*;
    use crate::config::{HeadKind, Method};

    #[test]
    fn file_then_overrides() {
        let c = load(
            "[model]\narch = \"resnet110\"\nk = 4\n[method]\nname = \"mlaan-dgl\"\n",
            &["model.k=8", "optim.lr=0.05", "method.head=1c2f"],
        )
        .unwrap();
        assert_eq!(c.model.arch, "resnet110");
        assert_eq!(c.model.k, 8);
        assert_eq!(c.optim.lr, 0.05);
        assert_eq!(c.method.name, Method::MlaanDgl);
        assert_eq!(c.method.head, Some(HeadKind::OneConvTwoFc));
    }

    #[test]
    fn unknown_keys_are_quoted() {
        let e = load("[optim]\nlrr = 0.1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("lrr"), "{e}");
        let e = load("[optimizer]\nlr = 0.1\n", &[]).unwrap_err().to_string();
        assert!(e.contains("optimizer"), "{e}");
        let e = load("", &["train.epoch=3"]).unwrap_err().to_string();
        assert!(e.contains("epoch"), "{e}");
        // Each error names the input that brought the key, and calls it unknown.
        let e = load("[train]\nepochs = 2\n", &["model.k=2", "optim.lrr=0.1"]).unwrap_err();
        let e = e.to_string();
        assert!(e.starts_with("command-line setting `optim.lrr=0.1`: unknown key `lrr`"), "{e}");
        let e = load("[train]\nepochs = 2\n\n[optim]\nlrr = 0.1\n", &[]).unwrap_err();
        let e = e.to_string();
        assert!(e.contains(", line 5: unknown key `lrr`") && !e.contains("TOML"), "{e}");
    }

    #[test]
    fn override_syntax_errors() {
        let mut t = toml::Table::new();
        assert!(set_dotted(&mut t, "no-equals").is_err());
        assert!(set_dotted(&mut t, "a..b=1").is_err());
        set_dotted(&mut t, "a.b=1").unwrap();
        assert!(set_dotted(&mut t, "a.b.c=1").is_err());
        set_dotted(&mut t, "data.dataset=cifar10").unwrap();
        assert_eq!(t["data"]["dataset"].as_str(), Some("cifar10"));
    }
}
