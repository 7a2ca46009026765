//! A HuJSON reader: JSON plus `//` and `/* */` comments and trailing commas, keeping the
//! line and column of every value so that validation errors can point at the element.

use std::fmt;

/// A position in the source text (1-based line and column, column counted in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line number.
    pub line: u32,
    /// 1-based column, in characters.
    pub column: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A JSON value with the position where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where the value starts.
    pub pos: Pos,
}

/// A JSON value whose children carry positions.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number, kept as written.
    Number(String),
    /// A string.
    String(String),
    /// An array.
    Array(Vec<Node>),
    /// An object, members in source order; keys carry their own position.
    Object(Vec<(Key, Node)>),
}

/// An object key with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// The key text.
    pub name: String,
    /// Where the key starts.
    pub pos: Pos,
}

/// A syntax error in HuJSON text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {}, column {}: {message}", pos.line, pos.column)]
pub struct SyntaxError {
    /// Where the error was found.
    pub pos: Pos,
    /// What is wrong.
    pub message: String,
}

impl Value {
    /// A short name of the value's JSON type, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }
}

impl Node {
    /// Converts to a plain `serde_json::Value` (positions dropped).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Number(n) => serde_json::from_str(n).unwrap_or(serde_json::Value::Null),
            Value::String(s) => serde_json::Value::String(s.clone()),
            Value::Array(a) => serde_json::Value::Array(a.iter().map(Node::to_json).collect()),
            Value::Object(o) => serde_json::Value::Object(
                o.iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

/// Nesting deeper than this is rejected (keeps recursion bounded on hostile input).
const MAX_DEPTH: usize = 128;

/// Parses HuJSON text into a positioned tree.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    Ok(parse_groups_reusing(text, &mut |_, _, _, _| None)?.root)
}

/// Where a member of the top-level `groups` object lies in the text (byte offsets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberSpan {
    /// The member's key as written (unescaped).
    pub name: String,
    /// The key's opening quote.
    pub key: usize,
    /// The value's first byte.
    pub value: usize,
    /// Just past the value's last byte.
    pub end: usize,
}

/// What [`parse_groups_reusing`] read.
pub(crate) struct GroupsRead {
    /// The tree.
    pub root: Node,
    /// Where the `groups` members lie.
    pub groups: Vec<MemberSpan>,
    /// The indices (into `groups`) of the members whose values were taken as read.
    pub reused: Vec<usize>,
    /// Where the top-level members lie (the values of those taken as read are `null` in
    /// the tree).
    pub top: Vec<MemberSpan>,
}

/// [`parse`], also telling where each member of the top-level object and of its `groups`
/// object lies. At each such member (`groups` itself aside), `reuse(top, key, key offset,
/// value offset)` may give the offset just past its value (`top`: a member of the top-level
/// object): the caller knows those bytes (from an earlier text it read) to be a complete
/// value, so they are stepped over, not read, and the member's value in the tree is `null`.
pub(crate) fn parse_groups_reusing(
    text: &str,
    reuse: &mut dyn FnMut(bool, &str, usize, usize) -> Option<usize>,
) -> Result<GroupsRead, SyntaxError> {
    let mut p = Parser {
        text,
        i: 0,
        line: 1,
        col: 1,
        groups_next: false,
        reuse,
        spans: Vec::new(),
        reused: Vec::new(),
        top: Vec::new(),
    };
    p.skip_ws()?;
    let v = p.value(0)?;
    p.skip_ws()?;
    if p.i < p.text.len() {
        return Err(p.err("unexpected text after the top-level value"));
    }
    Ok(GroupsRead {
        root: v,
        groups: p.spans,
        reused: p.reused,
        top: p.top,
    })
}

/// How many bytes of `b` are `which` (counted 64 at a time, in a form compilers vectorize).
fn count_bytes(b: &[u8], which: impl Fn(u8) -> bool) -> u32 {
    let n: usize = b
        .chunks(64)
        .map(|c| usize::from(c.iter().map(|&x| u8::from(which(x))).sum::<u8>()))
        .sum();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// How many characters the UTF-8 bytes `b` hold (the bytes that do not continue one).
fn char_count(b: &[u8]) -> u32 {
    count_bytes(b, |c| c & 0xC0 != 0x80)
}

/// Where the last line break of `b` is, searched 64 bytes at a time from the end (a policy
/// written on one line, as APIs send it, has none to find in tens of kilobytes).
fn last_line_break(b: &[u8]) -> Option<usize> {
    let mut end = b.len();
    for block in b.rchunks(64) {
        let start = end - block.len();
        if block.iter().fold(false, |seen, &c| seen | (c == b'\n')) {
            return block.iter().rposition(|&c| c == b'\n').map(|i| start + i);
        }
        end = start;
    }
    None
}

/// The position of byte `offset` of `text` (its end, past it).
pub(crate) fn pos_at(text: &str, offset: usize) -> Pos {
    let b = text.as_bytes().get(..offset).unwrap_or(text.as_bytes());
    let line_start = last_line_break(b).map_or(0, |i| i + 1);
    Pos {
        line: 1 + count_bytes(b, |c| c == b'\n'),
        column: 1 + char_count(&b[line_start..]),
    }
}

/// Reads `text` from byte `i` (always at a character boundary).
struct Parser<'t, 'r> {
    text: &'t str,
    i: usize,
    line: u32,
    col: u32,
    /// The next object read is the top-level `groups` object.
    groups_next: bool,
    reuse: &'r mut dyn FnMut(bool, &str, usize, usize) -> Option<usize>,
    spans: Vec<MemberSpan>,
    reused: Vec<usize>,
    top: Vec<MemberSpan>,
}

impl Parser<'_, '_> {
    fn pos(&self) -> Pos {
        Pos {
            line: self.line,
            column: self.col,
        }
    }

    fn err(&self, msg: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos: self.pos(),
            message: msg.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        match self.text.as_bytes().get(self.i) {
            Some(&b) if b.is_ascii() => Some(char::from(b)),
            Some(_) => self.text.get(self.i..)?.chars().next(),
            None => None,
        }
    }

    /// The character after the next one.
    fn peek2(&self) -> Option<char> {
        self.text.get(self.i..)?.chars().nth(1)
    }

    /// Steps to byte `end` (a character boundary past `i`), keeping the line and column.
    fn step_to(&mut self, end: usize) {
        let skipped = self.text.as_bytes().get(self.i..end).unwrap_or_default();
        let lines = count_bytes(skipped, |c| c == b'\n');
        if lines > 0 {
            let last = last_line_break(skipped).unwrap_or_default();
            self.line = self.line.saturating_add(lines);
            self.col = 1 + char_count(&skipped[last + 1..]);
        } else {
            self.col = self.col.saturating_add(char_count(skipped));
        }
        self.i = end;
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.i += c.len_utf8();
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }

    fn skip_ws(&mut self) -> Result<(), SyntaxError> {
        loop {
            // Plain blanks a byte at a time.
            while let Some(&b) = self.text.as_bytes().get(self.i) {
                match b {
                    b' ' | b'\t' | b'\r' => self.col += 1,
                    b'\n' => {
                        self.line += 1;
                        self.col = 1;
                    }
                    _ => break,
                }
                self.i += 1;
            }
            match self.peek() {
                Some('\u{feff}') => {
                    self.bump();
                }
                Some('/') => {
                    let start = self.pos();
                    match self.peek2() {
                        Some('/') => {
                            while let Some(c) = self.peek() {
                                if c == '\n' {
                                    break;
                                }
                                self.bump();
                            }
                        }
                        Some('*') => {
                            self.bump();
                            self.bump();
                            loop {
                                match self.bump() {
                                    None => {
                                        return Err(SyntaxError {
                                            pos: start,
                                            message: "unterminated /* comment".into(),
                                        })
                                    }
                                    Some('*') if self.peek() == Some('/') => {
                                        self.bump();
                                        break;
                                    }
                                    Some(_) => {}
                                }
                            }
                        }
                        _ => return Err(self.err("invalid character '/'")),
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        let pos = self.pos();
        let value = match self.peek() {
            None => return Err(self.err("unexpected end of input")),
            Some('{') => self.object(depth)?,
            Some('[') => self.array(depth)?,
            Some('"') => Value::String(self.string()?),
            Some('t') => self.literal("true", Value::Bool(true))?,
            Some('f') => self.literal("false", Value::Bool(false))?,
            Some('n') => self.literal("null", Value::Null)?,
            Some(c) if c == '-' || c.is_ascii_digit() => self.number()?,
            Some(c) => return Err(self.err(format!("invalid character {c:?} looking for a value"))),
        };
        Ok(Node { value, pos })
    }

    fn literal(&mut self, word: &str, v: Value) -> Result<Value, SyntaxError> {
        for expected in word.chars() {
            if self.peek() != Some(expected) {
                return Err(self.err(format!("invalid literal, expected {word:?}")));
            }
            self.bump();
        }
        Ok(v)
    }

    fn number(&mut self) -> Result<Value, SyntaxError> {
        let start = self.i;
        if self.peek() == Some('-') {
            self.bump();
        }
        let digits = |p: &mut Parser| {
            let s = p.i;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.bump();
            }
            p.i - s
        };
        let int_start = self.i;
        if digits(self) == 0 {
            return Err(self.err("invalid number"));
        }
        if self.text.as_bytes().get(int_start) == Some(&b'0') && self.i - int_start > 1 {
            return Err(self.err("invalid number: leading zero"));
        }
        if self.peek() == Some('.') {
            self.bump();
            if digits(self) == 0 {
                return Err(self.err("invalid number: digits expected after '.'"));
            }
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            self.bump();
            if matches!(self.peek(), Some('+' | '-')) {
                self.bump();
            }
            if digits(self) == 0 {
                return Err(self.err("invalid number: digits expected in exponent"));
            }
        }
        Ok(Value::Number(
            self.text.get(start..self.i).unwrap_or_default().to_string(),
        ))
    }

    fn hex4(&mut self) -> Result<u32, SyntaxError> {
        let mut v = 0u32;
        for _ in 0..4 {
            let c = self
                .bump()
                .ok_or_else(|| self.err("unterminated \\u escape"))?;
            let d = c
                .to_digit(16)
                .ok_or_else(|| self.err("invalid \\u escape"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, SyntaxError> {
        let start = self.pos();
        self.bump(); // opening quote
        let mut out = String::new();
        loop {
            // A run of plain characters at once (no line breaks in it: they are control
            // characters, which end the run).
            let rest = self.text.as_bytes().get(self.i..).unwrap_or_default();
            let run = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                .unwrap_or(rest.len());
            if run > 0 {
                // The run ends at an ASCII byte (or the end): a character boundary.
                out.reserve(run);
                out.push_str(self.text.get(self.i..self.i + run).unwrap_or_default());
                self.col = self.col.saturating_add(char_count(&rest[..run]));
                self.i += run;
            }
            let c = self.bump().ok_or(SyntaxError {
                pos: start,
                message: "unterminated string".into(),
            })?;
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let e = self.bump().ok_or_else(|| self.err("unterminated escape"))?;
                    match e {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        '/' => out.push('/'),
                        'b' => out.push('\u{8}'),
                        'f' => out.push('\u{c}'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if self.peek() == Some('\\') && self.peek2() == Some('u') {
                                    self.bump();
                                    self.bump();
                                    let lo = self.hex4()?;
                                    if (0xDC00..0xE000).contains(&lo) {
                                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                                    } else {
                                        0xFFFD
                                    }
                                } else {
                                    0xFFFD
                                }
                            } else {
                                hi
                            };
                            out.push(char::from_u32(cp).unwrap_or('\u{FFFD}'));
                        }
                        other => return Err(self.err(format!("invalid escape '\\{other}'"))),
                    }
                }
                c if (c as u32) < 0x20 => {
                    return Err(self.err("invalid control character in string"))
                }
                c => out.push(c),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        self.bump();
        let mut items = Vec::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some(']') => {
                    self.bump();
                    return Ok(Value::Array(items));
                }
                None => return Err(self.err("unterminated array")),
                _ => {}
            }
            items.push(self.value(depth + 1)?);
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some(']') => {}
                _ => return Err(self.err("expected ',' or ']' after array element")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        let groups = std::mem::take(&mut self.groups_next) && depth == 1;
        self.bump();
        let mut members: Vec<(Key, Node)> = Vec::new();
        loop {
            self.skip_ws()?;
            match self.peek() {
                Some('}') => {
                    self.bump();
                    return Ok(Value::Object(members));
                }
                Some('"') => {}
                None => return Err(self.err("unterminated object")),
                Some(_) => return Err(self.err("expected a string key or '}'")),
            }
            let kpos = self.pos();
            let kstart = self.i;
            let name = self.string()?;
            if members.iter().any(|(k, _)| k.name == name) {
                return Err(SyntaxError {
                    pos: kpos,
                    message: format!("duplicate key {name:?}"),
                });
            }
            self.skip_ws()?;
            if self.peek() != Some(':') {
                return Err(self.err("expected ':' after object key"));
            }
            self.bump();
            self.skip_ws()?;
            let vstart = self.i;
            let top = depth == 0;
            let reused = if groups || (top && name != "groups") {
                (self.reuse)(top, &name, kstart, vstart).filter(|&end| {
                    end > vstart && end <= self.text.len() && self.text.is_char_boundary(end)
                })
            } else {
                None
            };
            let v = match reused {
                Some(end) => {
                    let pos = self.pos();
                    self.step_to(end);
                    if !top {
                        self.reused.push(self.spans.len());
                    }
                    Node {
                        value: Value::Null,
                        pos,
                    }
                }
                None => {
                    self.groups_next = depth == 0 && name == "groups";
                    let v = self.value(depth + 1);
                    self.groups_next = false;
                    v?
                }
            };
            let span = || MemberSpan {
                name: name.clone(),
                key: kstart,
                value: vstart,
                end: self.i,
            };
            if groups {
                self.spans.push(span());
            } else if top {
                self.top.push(span());
            }
            members.push((Key { name, pos: kpos }, v));
            self.skip_ws()?;
            match self.peek() {
                Some(',') => {
                    self.bump();
                }
                Some('}') => {}
                _ => return Err(self.err("expected ',' or '}' after object member")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_trailing_commas() {
        let v = parse("// hi\n{\n  /* c */ \"a\": [1, 2,],\n  \"b\": true, // x\n}\n").unwrap();
        assert_eq!(v.to_json(), serde_json::json!({"a": [1, 2], "b": true}));
    }

    #[test]
    fn the_last_line_break_is_found_across_blocks() {
        for len in [0usize, 1, 63, 64, 65, 200] {
            for at in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut b = vec![b'x'; len];
                if let Some(i) = at.filter(|&i| i < len) {
                    b[i] = b'\n';
                }
                let want = b.iter().rposition(|&c| c == b'\n');
                assert_eq!(last_line_break(&b), want, "len {len}, break at {at:?}");
            }
        }
        let text = format!("{{\n\"a\":{}é\"", " ".repeat(130));
        assert_eq!(
            pos_at(&text, text.len()),
            Pos {
                line: 2,
                column: 1 + 4 + 130 + 1 + 1
            }
        );
    }

    #[test]
    fn positions_are_tracked() {
        let v = parse("{\n  \"a\": \"x\"\n}").unwrap();
        let Value::Object(m) = v.value else {
            unreachable!()
        };
        assert_eq!(m[0].0.pos, Pos { line: 2, column: 3 });
        assert_eq!(m[0].1.pos, Pos { line: 2, column: 8 });
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        let v = parse("{\"é\": \"üx\\u00e9\", \"b\": \"\u{1F600}\"}").unwrap();
        let Value::Object(m) = v.value else {
            unreachable!()
        };
        assert_eq!(m[0].1.value, Value::String("üxé".into()));
        assert_eq!(
            m[1].0.pos,
            Pos {
                line: 1,
                column: 19
            }
        );
        assert_eq!(
            m[1].1.pos,
            Pos {
                line: 1,
                column: 24
            }
        );
        assert_eq!(m[1].1.value, Value::String("\u{1F600}".into()));
    }

    #[test]
    fn errors_have_positions() {
        let e = parse("{\n  \"a\": tru\n}").unwrap_err();
        assert_eq!(e.pos.line, 2);
        let e = parse("{\"a\":1,\"a\":2}").unwrap_err();
        assert!(e.message.contains("duplicate"));
        assert!(parse("[1 2]").is_err());
        assert!(parse("{\"a\":1} x").is_err());
        assert!(parse("\"abc").is_err());
        assert!(parse("/* x").is_err());
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let s = "[".repeat(10_000);
        assert!(parse(&s).is_err());
    }
}
