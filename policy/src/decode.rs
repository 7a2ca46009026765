//! Reading typed values out of the positioned HuJSON tree the way Tailscale's service decodes a
//! policy: field names match case-insensitively (`"ACLs"`, `"Action"`), unknown fields are
//! errors, a field given twice (in any case) is an error, `null` stands for an empty value,
//! and every error carries the JSON path and line:column of the element.

use crate::error::PolicyError;
use crate::hujson::{Key, Node, Pos, Value};

/// Builds a validation error.
pub(crate) fn invalid(message: impl Into<String>, path: &str, pos: Pos) -> PolicyError {
    PolicyError::Invalid {
        message: message.into(),
        path: if path.is_empty() {
            "$".into()
        } else {
            path.into()
        },
        pos,
    }
}

/// A value in the tree with its JSON path.
#[derive(Clone)]
pub(crate) struct Ctx<'a> {
    path: PathText,
    pub node: &'a Node,
}

/// A JSON path, spelt out only when asked for: array elements share their array's path
/// (policies list thousands of group members, and their paths are read only for errors).
#[derive(Clone)]
enum PathText {
    Whole(String),
    Element(std::rc::Rc<str>, usize),
}

/// The members of a struct-like object, checked against its known fields.
pub(crate) struct Fields<'a> {
    members: Vec<(&'a Key, Ctx<'a>)>,
}

impl<'a> Fields<'a> {
    /// The field `name` (matched case-insensitively), unless absent.
    pub fn get(&self, name: &str) -> Option<&Ctx<'a>> {
        self.members
            .iter()
            .find(|(k, _)| k.name.eq_ignore_ascii_case(name))
            .map(|(_, c)| c)
    }

    /// The field `name` unless absent or `null`.
    pub fn present(&self, name: &str) -> Option<&Ctx<'a>> {
        self.get(name).filter(|c| !c.is_null())
    }
}

/// The closest known field to a misspelt one, for a hint.
fn suggestion<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    fn distance(a: &str, b: &str) -> usize {
        let a: Vec<char> = a.to_ascii_lowercase().chars().collect();
        let b: Vec<char> = b.to_ascii_lowercase().chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.iter().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                let sub = prev[j] + usize::from(ca != cb);
                cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    // `dst` for `destination`, `src` for `source`: the known name spelt out.
    fn abbreviates(short: &str, long: &str) -> bool {
        let mut rest = long.chars().map(|c| c.to_ascii_lowercase());
        short.len() >= 3
            && short.len() < long.len()
            && short
                .chars()
                .map(|c| c.to_ascii_lowercase())
                .all(|c| rest.any(|x| x == c))
    }
    known
        .iter()
        .map(|k| (distance(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
        .or_else(|| known.iter().copied().find(|k| abbreviates(k, name)))
}

impl<'a> Ctx<'a> {
    /// The root value (path `$`).
    pub fn root(node: &'a Node) -> Ctx<'a> {
        Ctx {
            path: PathText::Whole(String::new()),
            node,
        }
    }

    /// The value's JSON path (empty for the root).
    pub fn path(&self) -> std::borrow::Cow<'_, str> {
        match &self.path {
            PathText::Whole(p) => std::borrow::Cow::Borrowed(p),
            PathText::Element(base, i) => std::borrow::Cow::Owned(format!("{base}[{i}]")),
        }
    }

    pub fn err(&self, message: impl Into<String>) -> PolicyError {
        invalid(message, &self.path(), self.node.pos)
    }

    pub fn is_null(&self) -> bool {
        matches!(self.node.value, Value::Null)
    }

    fn child_path(&self, k: &str) -> String {
        let plain = k.starts_with(|c: char| c.is_ascii_alphabetic())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let path = self.path();
        match (plain, path.is_empty()) {
            (true, true) => k.to_string(),
            (true, false) => format!("{path}.{k}"),
            (false, _) => format!("{path}[{k:?}]"),
        }
    }

    /// The members of a map-like object (keys are data: group, tag, host names ...);
    /// `null` is an empty map.
    pub fn map(&self, what: &str) -> Result<Vec<(&'a Key, Ctx<'a>)>, PolicyError> {
        match &self.node.value {
            Value::Object(m) => Ok(m
                .iter()
                .map(|(k, v)| {
                    (
                        k,
                        Ctx {
                            path: PathText::Whole(self.child_path(&k.name)),
                            node: v,
                        },
                    )
                })
                .collect()),
            Value::Null => Ok(Vec::new()),
            other => Err(self.err(format!("{what} must be an object, not {}", other.kind()))),
        }
    }

    /// The fields of a struct-like object: names match `known` case-insensitively; keys
    /// starting with `#` are comments when `comments` is set; anything else is an error, as is
    /// a field given twice.
    pub fn fields(
        &self,
        what: &str,
        known: &[&str],
        comments: bool,
    ) -> Result<Fields<'a>, PolicyError> {
        let mut members: Vec<(&'a Key, Ctx<'a>)> = Vec::new();
        for (k, c) in self.map(what)? {
            if comments && k.name.starts_with('#') {
                continue;
            }
            let Some(canonical) = known.iter().find(|n| n.eq_ignore_ascii_case(&k.name)) else {
                let hint = match suggestion(&k.name, known) {
                    Some(s) => format!(" (did you mean {s:?}?)"),
                    None => format!(" ({what} fields: {})", known.join(", ")),
                };
                return Err(invalid(
                    format!("json: unknown field {:?}{hint}", k.name),
                    &c.path(),
                    k.pos,
                ));
            };
            if let Some((first, _)) = members
                .iter()
                .find(|(f, _)| f.name.eq_ignore_ascii_case(canonical))
            {
                return Err(invalid(
                    format!(
                        "field {:?} is given twice: {:?} is already at line {}, column {}",
                        k.name, first.name, first.pos.line, first.pos.column
                    ),
                    &c.path(),
                    k.pos,
                ));
            }
            members.push((k, c));
        }
        Ok(Fields { members })
    }

    /// The elements of an array; `null` is an empty array.
    pub fn array(&self, what: &str) -> Result<Vec<Ctx<'a>>, PolicyError> {
        match &self.node.value {
            Value::Array(a) => {
                let base: std::rc::Rc<str> = std::rc::Rc::from(&*self.path());
                Ok(a.iter()
                    .enumerate()
                    .map(|(i, v)| Ctx {
                        path: PathText::Element(base.clone(), i),
                        node: v,
                    })
                    .collect())
            }
            Value::Null => Ok(Vec::new()),
            other => Err(self.err(format!("{what} must be an array, not {}", other.kind()))),
        }
    }

    pub fn string(&self, what: &str) -> Result<&'a str, PolicyError> {
        match &self.node.value {
            Value::String(s) => Ok(s),
            other => Err(self.err(format!("{what} must be a string, not {}", other.kind()))),
        }
    }

    /// A string, or `""` for `null`.
    pub fn string_or_empty(&self, what: &str) -> Result<&'a str, PolicyError> {
        if self.is_null() {
            Ok("")
        } else {
            self.string(what)
        }
    }

    /// An array of strings, each with its context.
    pub fn strings(&self, what: &str) -> Result<Vec<(&'a str, Ctx<'a>)>, PolicyError> {
        self.array(what)?
            .into_iter()
            .map(|c| Ok((c.string(what)?, c)))
            .collect()
    }

    pub fn bool(&self, what: &str) -> Result<bool, PolicyError> {
        match &self.node.value {
            Value::Bool(b) => Ok(*b),
            Value::Null => Ok(false),
            other => Err(self.err(format!(
                "{what} must be true or false, not {}",
                other.kind()
            ))),
        }
    }
}

/// Hands every string value in the tree, with where it is, to `f` (for whole-file checks).
pub(crate) fn each_string<'a>(node: &'a Node, f: &mut impl FnMut(&'a str, Pos)) {
    match &node.value {
        Value::String(s) => f(s, node.pos),
        Value::Array(a) => a.iter().for_each(|n| each_string(n, f)),
        Value::Object(m) => m.iter().for_each(|(_, n)| each_string(n, f)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::suggestion;

    #[test]
    fn suggestions() {
        assert_eq!(suggestion("acl", &["acls", "grants"]), Some("acls"));
        assert_eq!(
            suggestion("tagowners", &["tagOwners", "hosts"]),
            Some("tagOwners")
        );
        assert_eq!(suggestion("zzzzzz", &["acls", "grants"]), None);
        assert_eq!(suggestion("destination", &["src", "dst"]), Some("dst"));
        assert_eq!(suggestion("source", &["src", "dst"]), Some("src"));
    }
}
