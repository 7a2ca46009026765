//! Device posture: the condition grammar of `postures` entries, device attribute values, and
//! evaluation (with Tailscale's version ordering for `node:osVersion` / `node:tsVersion`).
//!
//! A condition is `<namespace>:<key> <operator> [<value>]`: `node:os == 'macos'`,
//! `node:tsVersion >= '1.60'`, `ip:country IN ['CA', 'US']`, `custom:tier > 2`,
//! `falcon:ztaScore IS SET`. Operators: `==`, `!=`, `<`, `<=`, `>`, `>=` (ordered ones only on
//! numbers and versions), `IN` / `NOT IN` (a list), `IS SET` / `NOT SET` (no value); operator
//! words in any case; a bare attribute means `== true`. A device lacking the attribute fails
//! every condition but `NOT SET`.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The value of a device posture attribute: a string, a number or a bool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PostureValue {
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Number(serde_json::Number),
    /// A string (versions and names are strings).
    String(String),
}

impl fmt::Display for PostureValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostureValue::Bool(b) => write!(f, "{b}"),
            PostureValue::Number(n) => write!(f, "{n}"),
            PostureValue::String(s) => write!(f, "{s}"),
        }
    }
}

impl PostureValue {
    fn as_f64(&self) -> Option<f64> {
        match self {
            PostureValue::Number(n) => n.as_f64(),
            PostureValue::String(s) => s.trim().parse().ok(),
            PostureValue::Bool(_) => None,
        }
    }
}

/// Device posture attributes by name (`node:os`, `custom:tier`, ...).
pub type PostureAttrs = BTreeMap<String, PostureValue>;

/// A comparison operator of a posture condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostureOp {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `IN [..]`
    In,
    /// `NOT IN [..]`
    NotIn,
    /// `IS SET`
    IsSet,
    /// `NOT SET`
    NotSet,
}

/// One parsed posture condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostureCondition {
    /// The attribute, `namespace:key`.
    pub attr: String,
    /// The operator.
    pub op: PostureOp,
    /// The values compared with (one, a list for `IN`/`NOT IN`, none for `IS SET`/`NOT SET`).
    pub values: Vec<PostureValue>,
}

/// A named posture: every condition must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posture {
    /// The conditions, as parsed.
    pub conditions: Vec<PostureCondition>,
}

impl Posture {
    /// Whether a device with `attrs` satisfies every condition.
    pub fn matches(&self, attrs: &PostureAttrs) -> bool {
        self.conditions.iter().all(|c| c.matches(attrs))
    }
}

/// Whether an attribute holds a version string (ordered with [`compare_versions`]).
pub fn is_version_attr(attr: &str) -> bool {
    let key = attr.rsplit_once(':').map_or(attr, |(_, k)| k);
    key.to_ascii_lowercase().ends_with("version")
}

fn values_equal(attr: &str, have: &PostureValue, want: &PostureValue) -> bool {
    match (have, want) {
        (PostureValue::Bool(a), PostureValue::Bool(b)) => a == b,
        (PostureValue::Number(_), PostureValue::Number(_)) => have.as_f64() == want.as_f64(),
        (PostureValue::String(a), PostureValue::String(b)) if is_version_attr(attr) => {
            compare_versions(a, b) == Ordering::Equal
        }
        (PostureValue::String(a), PostureValue::String(b)) => a == b,
        // Values set through an API may arrive as strings: compare what they say.
        _ => have.to_string() == want.to_string(),
    }
}

fn ordering(attr: &str, have: &PostureValue, want: &PostureValue) -> Option<Ordering> {
    if let (PostureValue::String(a), PostureValue::String(b)) = (have, want) {
        if is_version_attr(attr) {
            return Some(compare_versions(a, b));
        }
    }
    if is_version_attr(attr) {
        return Some(compare_versions(&have.to_string(), &want.to_string()));
    }
    have.as_f64()?.partial_cmp(&want.as_f64()?)
}

impl PostureCondition {
    /// Whether a device with `attrs` satisfies this condition.
    pub fn matches(&self, attrs: &PostureAttrs) -> bool {
        let have = attrs.get(&self.attr);
        match (self.op, have) {
            (PostureOp::IsSet, h) => h.is_some(),
            (PostureOp::NotSet, h) => h.is_none(),
            // Every other operator fails on a device without the attribute.
            (_, None) => false,
            (op, Some(h)) => {
                let first = self.values.first();
                match op {
                    PostureOp::Eq => first.is_some_and(|w| values_equal(&self.attr, h, w)),
                    PostureOp::Ne => first.is_some_and(|w| !values_equal(&self.attr, h, w)),
                    PostureOp::In => self.values.iter().any(|w| values_equal(&self.attr, h, w)),
                    PostureOp::NotIn => !self.values.iter().any(|w| values_equal(&self.attr, h, w)),
                    PostureOp::Lt | PostureOp::Le | PostureOp::Gt | PostureOp::Ge => {
                        let Some(ord) = first.and_then(|w| ordering(&self.attr, h, w)) else {
                            return false;
                        };
                        match op {
                            PostureOp::Lt => ord == Ordering::Less,
                            PostureOp::Le => ord != Ordering::Greater,
                            PostureOp::Gt => ord == Ordering::Greater,
                            _ => ord != Ordering::Less,
                        }
                    }
                    PostureOp::IsSet | PostureOp::NotSet => true,
                }
            }
        }
    }
}

/// Compares two version strings the way Tailscale orders client and OS versions: runs of
/// non-digits compare as text, runs of digits as numbers, a missing run counts as empty / 0
/// (so `1.60` < `1.60.1` < `1.62`, and `1.2` < `1.2.0` < `1.2.0-beta`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(s: &str, digits: bool) -> (&str, &str) {
        let end = s
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() != digits)
            .map_or(s.len(), |(i, _)| i);
        s.split_at(end)
    }
    fn number(s: &str) -> (usize, &str) {
        // Compare digit runs without overflow: drop leading zeros, then length, then text.
        let t = s.trim_start_matches('0');
        (t.len(), t)
    }
    let (mut a, mut b) = (a.trim(), b.trim());
    while !a.is_empty() || !b.is_empty() {
        let (ta, ra) = split(a, false);
        let (tb, rb) = split(b, false);
        match ta.cmp(tb) {
            Ordering::Equal => {}
            o => return o,
        }
        let (na, ra) = split(ra, true);
        let (nb, rb) = split(rb, true);
        match number(na).cmp(&number(nb)) {
            Ordering::Equal => {}
            o => return o,
        }
        a = ra;
        b = rb;
    }
    Ordering::Equal
}

/// Checks a posture attribute name: `namespace:key`.
pub fn check_attr_name(attr: &str) -> Result<(), String> {
    let ok = attr.split_once(':').is_some_and(|(ns, key)| {
        !ns.is_empty()
            && !key.is_empty()
            && ns
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "posture attribute {attr:?} is not valid: write it as namespace:key, e.g. \"node:os\" or \"custom:tier\""
        ))
    }
}

struct Lexer<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Lexer<'a> {
    fn skip_ws(&mut self) {
        while self.s[self.i..].starts_with(char::is_whitespace) {
            self.i += self.s[self.i..].chars().next().map_or(1, char::len_utf8);
        }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.i..]
    }

    fn word(&mut self) -> &'a str {
        self.skip_ws();
        let r = self.rest();
        let end = r
            .find(|c: char| c.is_whitespace() || "=!<>[],'\"".contains(c))
            .unwrap_or(r.len());
        self.i += end;
        &r[..end]
    }

    fn keyword(&mut self, kw: &str) -> bool {
        self.skip_ws();
        let r = self.rest();
        let n = kw.len();
        let matches = r.get(..n).is_some_and(|p| p.eq_ignore_ascii_case(kw))
            && !r[n..].starts_with(|c: char| c.is_ascii_alphanumeric());
        if matches {
            self.i += n;
        }
        matches
    }

    fn value(&mut self) -> Result<PostureValue, String> {
        self.skip_ws();
        let r = self.rest();
        if let Some(q) = r.chars().next().filter(|c| *c == '\'' || *c == '"') {
            let body = &r[1..];
            let Some(end) = body.find(q) else {
                return Err(format!("unterminated string {r:?}"));
            };
            self.i += end + 2;
            return Ok(PostureValue::String(body[..end].to_string()));
        }
        let w = self.word();
        if w.is_empty() {
            return Err("a value is missing".into());
        }
        if w.eq_ignore_ascii_case("true") {
            return Ok(PostureValue::Bool(true));
        }
        if w.eq_ignore_ascii_case("false") {
            return Ok(PostureValue::Bool(false));
        }
        match serde_json::from_str::<serde_json::Number>(w) {
            Ok(n) => Ok(PostureValue::Number(n)),
            Err(_) => Err(format!(
                "{w:?} is not a value: quote strings ('{w}'), numbers and true/false are bare"
            )),
        }
    }

    fn list(&mut self) -> Result<Vec<PostureValue>, String> {
        self.skip_ws();
        if !self.rest().starts_with('[') {
            return Err("IN and NOT IN take a list, e.g. ['a', 'b']".into());
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            if self.rest().starts_with(']') {
                self.i += 1;
                break;
            }
            out.push(self.value()?);
            self.skip_ws();
            if self.rest().starts_with(',') {
                self.i += 1;
            } else if self.rest().starts_with(']') {
                self.i += 1;
                break;
            } else {
                return Err("a list is written ['a', 'b']".into());
            }
        }
        if out.is_empty() {
            return Err("the list is empty".into());
        }
        Ok(out)
    }
}

/// Parses one condition of a `postures` entry.
pub fn parse_condition(text: &str) -> Result<PostureCondition, String> {
    let bad = |why: String| format!("posture condition {text:?}: {why}");
    let mut lx = Lexer { s: text, i: 0 };
    let attr = lx.word().to_string();
    if attr.is_empty() {
        return Err(bad("the attribute is missing".into()));
    }
    check_attr_name(&attr).map_err(bad)?;
    lx.skip_ws();
    let r = lx.rest();
    // A bare attribute (`node:tsAutoUpdate`, as in Tailscale's default policy) asks that it
    // be true.
    if r.is_empty() {
        return Ok(PostureCondition {
            attr,
            op: PostureOp::Eq,
            values: vec![PostureValue::Bool(true)],
        });
    }
    let symbolic = [
        ("==", PostureOp::Eq),
        ("!=", PostureOp::Ne),
        ("<=", PostureOp::Le),
        (">=", PostureOp::Ge),
        ("<", PostureOp::Lt),
        (">", PostureOp::Gt),
    ];
    let op = if let Some((sym, op)) = symbolic.iter().find(|(s, _)| r.starts_with(s)) {
        lx.i += sym.len();
        *op
    } else if lx.keyword("IN") {
        PostureOp::In
    } else if lx.keyword("IS") {
        if !lx.keyword("SET") {
            return Err(bad("IS must be followed by SET".into()));
        }
        PostureOp::IsSet
    } else if lx.keyword("NOT") {
        if lx.keyword("IN") {
            PostureOp::NotIn
        } else if lx.keyword("SET") {
            PostureOp::NotSet
        } else {
            return Err(bad("NOT must be followed by IN or SET".into()));
        }
    } else {
        return Err(bad(
            "expected an operator: ==, !=, <, <=, >, >=, IN, NOT IN, IS SET or NOT SET".into(),
        ));
    };
    let values = match op {
        PostureOp::IsSet | PostureOp::NotSet => Vec::new(),
        PostureOp::In | PostureOp::NotIn => lx.list().map_err(bad)?,
        _ => vec![lx.value().map_err(bad)?],
    };
    lx.skip_ws();
    if !lx.rest().is_empty() {
        return Err(bad(format!("unexpected {:?} at the end", lx.rest())));
    }
    if matches!(
        op,
        PostureOp::Lt | PostureOp::Le | PostureOp::Gt | PostureOp::Ge
    ) {
        let numeric = matches!(values.first(), Some(PostureValue::Number(_)));
        if !numeric && !is_version_attr(&attr) {
            return Err(bad(format!(
                "ordered comparisons apply only to numbers and versions (node:osVersion, node:tsVersion), not to {attr}"
            )));
        }
    }
    Ok(PostureCondition { attr, op, values })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn attrs(v: &[(&str, PostureValue)]) -> PostureAttrs {
        v.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn s(x: &str) -> PostureValue {
        PostureValue::String(x.into())
    }

    #[test]
    fn versions_order_like_tailscale() {
        use Ordering::*;
        assert_eq!(compare_versions("1.60", "1.60.1"), Less);
        assert_eq!(compare_versions("1.62.0", "1.60.1"), Greater);
        assert_eq!(compare_versions("1.2", "1.2.0"), Less);
        assert_eq!(compare_versions("1.2.0", "1.2.0"), Equal);
        assert_eq!(compare_versions("1.10", "1.9"), Greater);
        assert_eq!(compare_versions("14.2.1", "14.10"), Less);
        assert_eq!(compare_versions("1.80.0-t1234", "1.80.0"), Greater);
        assert_eq!(compare_versions("007", "7"), Equal);
        assert_eq!(compare_versions("99999999999999999999999", "1"), Greater);
    }

    #[test]
    fn conditions_parse_and_match() {
        let dev = attrs(&[
            ("node:os", s("macos")),
            ("node:tsVersion", s("1.62.1")),
            ("custom:tier", PostureValue::Number(3.into())),
            ("node:tsAutoUpdate", PostureValue::Bool(true)),
            ("ip:country", s("CA")),
        ]);
        let yes = [
            "node:os == 'macos'",
            "node:os IN ['macos', 'linux']",
            "node:os not in ['windows']",
            "node:tsVersion >= '1.60'",
            "node:tsVersion < \"1.70\"",
            "custom:tier > 2",
            "custom:tier == 3",
            "node:tsAutoUpdate == true",
            "node:tsAutoUpdate",
            "ip:country in ['CA','US']",
            "node:tsReleaseTrack NOT SET",
            "custom:tier IS SET",
        ];
        for c in yes {
            assert!(parse_condition(c).unwrap().matches(&dev), "{c}");
        }
        let no = [
            "node:os != 'macos'",
            "node:tsVersion >= '1.64'",
            "custom:tier <= 2",
            // Unset attributes fail every operator but NOT SET, even != and NOT IN.
            "node:osVersion != '1'",
            "node:tsReleaseTrack NOT IN ['unstable']",
            "node:os NOT SET",
        ];
        for c in no {
            assert!(!parse_condition(c).unwrap().matches(&dev), "{c}");
        }
    }

    #[test]
    fn malformed_conditions_are_errors() {
        for c in [
            "",
            "node:os = 'macos'",
            "nodeos == 'macos'",
            "node:os == macos",
            "node:os IN 'macos'",
            "node:os IN []",
            "node:os IS",
            "node:os < 'macos'",
            "node:os == 'macos' extra",
            "node:os == 'unterminated",
            "node:os NĂT IN ['a']",
            "node:os IĂ",
            "node:os Ă",
        ] {
            assert!(parse_condition(c).is_err(), "{c:?}");
        }
    }
}
