//! Table selection: `--tables` / `--exclude` glob patterns over `schema.table`.

use serde::{Deserialize, Serialize};

use crate::model::QualifiedName;

use super::ConfigError;

/// A glob (`*`, `?`) on the schema and the table name. `orders` means `*.orders`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pattern {
    pub schema: String,
    pub table: String,
}

impl Pattern {
    pub fn parse(field: &str, text: &str) -> Result<Pattern, ConfigError> {
        let invalid = |m: &str| ConfigError::Invalid {
            field: field.to_owned(),
            message: m.to_owned(),
        };
        if text.is_empty() {
            return Err(invalid("empty table pattern"));
        }
        let (schema, table) = match text.split_once('.') {
            Some((s, t)) => (s, t),
            None => ("*", text),
        };
        if schema.is_empty() || table.is_empty() || table.contains('.') {
            return Err(invalid(&format!(
                "pattern {text:?} must look like table or schema.table"
            )));
        }
        Ok(Pattern {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }

    pub fn matches(&self, name: &QualifiedName) -> bool {
        glob(&self.schema, &name.schema) && glob(&self.table, &name.name)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Which tables a job moves: all by default, narrowed by includes, minus excludes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    pub include: Vec<Pattern>,
    pub exclude: Vec<Pattern>,
}

impl Selection {
    pub fn selects(&self, name: &QualifiedName) -> bool {
        (self.include.is_empty() || self.include.iter().any(|p| p.matches(name)))
            && !self.exclude.iter().any(|p| p.matches(name))
    }

    /// True when the user narrowed the selection: objects outside it may then be missing.
    pub fn is_filtered(&self) -> bool {
        !self.include.is_empty() || !self.exclude.is_empty()
    }
}

/// Glob match with `*` (any run) and `?` (one character), case-sensitive like identifiers.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*", ""));
        assert!(glob("pay*", "payment_p2022_01"));
        assert!(glob("*_p2022_0?", "payment_p2022_01"));
        assert!(!glob("pay*x", "payment"));
        assert!(glob("a*b*c", "aXXbYYc"));
    }

    #[test]
    fn selection_defaults_to_everything() {
        let n = QualifiedName::new("public", "film");
        assert!(Selection::default().selects(&n));
        let sel = Selection {
            include: vec![Pattern::parse("--tables", "public.f*").unwrap()],
            exclude: vec![Pattern::parse("--exclude", "film").unwrap()],
        };
        assert!(!sel.selects(&n));
        assert!(sel.selects(&QualifiedName::new("public", "film_actor")));
        assert!(!sel.selects(&QualifiedName::new("other", "film_actor")));
        assert!(Pattern::parse("--tables", "a.b.c").is_err());
    }
}
