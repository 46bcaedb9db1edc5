//! Kubernetes label selectors and field selectors.
//!
//! List and watch requests carry `labelSelector` and `fieldSelector` query
//! parameters, and several resources embed selectors in their specs
//! (`metav1.LabelSelector` in Deployments, ReplicaSets, PodDisruptionBudgets,
//! ...; a plain map in `Service.spec.selector`). This module parses all of
//! those forms into one representation and matches it against objects, with
//! the same grammar, validation and matching rules as Kubernetes'
//! apimachinery `labels.Parse`, `metav1.LabelSelectorAsSelector` and
//! `fields.ParseSelector`, so clients see the same results (and the same kind
//! of error messages) as against a real kube-apiserver.
//!
//! Label selector grammar (whitespace between tokens is ignored):
//!
//! ```text
//! selector    := "" | requirement ("," requirement)*
//! requirement := ["!"] key
//!              | key ("=" | "==" | "!=" | ">" | "<") [value]
//!              | key ("in" | "notin") "(" [value ("," value)*] ")"
//! ```
//!
//! Field selectors are a comma-separated list of `field=value`,
//! `field==value` or `field!=value` terms, where `\,`, `\=` and `\\` escape
//! the special characters inside values. Which fields are selectable depends
//! on the resource kind, so that check is left to the caller (see
//! [`FieldSelector::fields`]).

use std::fmt;

use serde_json::{Map, Value};

/// Error returned when a selector cannot be parsed or fails validation.
///
/// A single variant carrying a one-line, human-readable message, because the
/// API server only ever turns it into a `400 Bad Request` status message.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum SelectorError {
    /// The selector is malformed or contains an invalid key or value.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> SelectorError {
    SelectorError::Invalid(msg.into())
}

// ---------------------------------------------------------------------------
// Validation of label keys and values
// ---------------------------------------------------------------------------

const QUALIFIED_NAME_MAX_LEN: usize = 63;
const LABEL_VALUE_MAX_LEN: usize = 63;
const DNS1123_SUBDOMAIN_MAX_LEN: usize = 253;

const QUALIFIED_NAME_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const QUALIFIED_NAME_ERR: &str = "must consist of alphanumeric characters, '-', '_' or '.', \
     and must start and end with an alphanumeric character";
const LABEL_VALUE_FMT: &str = "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?";
const LABEL_VALUE_ERR: &str = "a valid label must be an empty string or consist of alphanumeric \
     characters, '-', '_' or '.', and must start and end with an alphanumeric character";
const DNS1123_SUBDOMAIN_FMT: &str =
    "[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*";
const DNS1123_SUBDOMAIN_ERR: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
     alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";

/// Builds the same "must match this regex (e.g. ...)" text Kubernetes uses.
fn regex_error(msg: &str, fmt: &str, examples: &[&str]) -> String {
    let examples: Vec<String> = examples.iter().map(|e| format!("'{e}', ")).collect();
    format!(
        "{msg} (e.g. {}regex used for validation is '{fmt}')",
        examples.join("or ")
    )
}

fn max_len_error(n: usize) -> String {
    format!("must be no more than {n} characters")
}

/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`, anchored.
fn is_qualified_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    match (b.first(), b.last()) {
        (Some(first), Some(last)) => {
            first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        }
        _ => false,
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*`, anchored.
fn is_dns1123_subdomain_syntax(s: &str) -> bool {
    let lower_alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    s.split('.').all(|label| {
        let b = label.as_bytes();
        match (b.first(), b.last()) {
            (Some(first), Some(last)) => {
                lower_alnum(first)
                    && lower_alnum(last)
                    && b.iter().all(|c| lower_alnum(c) || *c == b'-')
            }
            _ => false,
        }
    })
}

/// Validates a label key (a Kubernetes "qualified name").
///
/// Keys are an optional DNS-1123 subdomain prefix of at most 253 characters
/// followed by `/`, then a name of at most 63 characters matching
/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`. Exposed so object validation
/// (e.g. of `metadata.labels`) can reuse the exact rules selectors enforce.
/// The error lists every problem found, joined with `"; "`.
pub fn validate_label_key(k: &str) -> Result<(), String> {
    let mut errs: Vec<String> = Vec::new();
    let parts: Vec<&str> = k.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_string());
            } else {
                if prefix.len() > DNS1123_SUBDOMAIN_MAX_LEN {
                    errs.push(format!(
                        "prefix part {}",
                        max_len_error(DNS1123_SUBDOMAIN_MAX_LEN)
                    ));
                }
                if !is_dns1123_subdomain_syntax(prefix) {
                    errs.push(format!(
                        "prefix part {}",
                        regex_error(
                            DNS1123_SUBDOMAIN_ERR,
                            DNS1123_SUBDOMAIN_FMT,
                            &["example.com"]
                        )
                    ));
                }
            }
            *name
        }
        _ => {
            return Err(format!(
                "a qualified name {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(
                    QUALIFIED_NAME_ERR,
                    QUALIFIED_NAME_FMT,
                    &["MyName", "my.name", "123-abc"]
                )
            ));
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_string());
    } else if name.len() > QUALIFIED_NAME_MAX_LEN {
        errs.push(format!(
            "name part {}",
            max_len_error(QUALIFIED_NAME_MAX_LEN)
        ));
    }
    if !is_qualified_name_part(name) {
        errs.push(format!(
            "name part {}",
            regex_error(
                QUALIFIED_NAME_ERR,
                QUALIFIED_NAME_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

/// Validates a label value: empty, or at most 63 characters matching
/// `([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]`.
///
/// Exposed so object validation of `metadata.labels` can share the rules
/// selectors enforce. The error lists every problem found, joined with `"; "`.
pub fn validate_label_value(v: &str) -> Result<(), String> {
    let mut errs: Vec<String> = Vec::new();
    if v.len() > LABEL_VALUE_MAX_LEN {
        errs.push(max_len_error(LABEL_VALUE_MAX_LEN));
    }
    if !v.is_empty() && !is_qualified_name_part(v) {
        errs.push(regex_error(
            LABEL_VALUE_ERR,
            LABEL_VALUE_FMT,
            &["MyValue", "my_value", "12345"],
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("; "))
    }
}

fn check_key(key: &str) -> Result<(), String> {
    validate_label_key(key).map_err(|e| format!("invalid label key {key:?}: {e}"))
}

fn check_value(key: &str, value: &str) -> Result<(), String> {
    validate_label_value(value)
        .map_err(|e| format!("invalid label value: {value:?}: at key: {key:?}: {e}"))
}

// ---------------------------------------------------------------------------
// Label selector requirements
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operator {
    Equals,
    DoubleEquals,
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    GreaterThan,
    LessThan,
}

/// One `key <op> values` clause; a selector is the AND of its requirements.
#[derive(Clone, Debug, PartialEq)]
struct Requirement {
    key: String,
    op: Operator,
    /// Sorted and deduplicated, so equality and the string form are canonical.
    values: Vec<String>,
}

impl Requirement {
    /// Validates and normalises a requirement, like apimachinery's
    /// `labels.NewRequirement`.
    fn new(key: &str, op: Operator, mut values: Vec<String>) -> Result<Self, String> {
        check_key(key)?;
        match op {
            Operator::In | Operator::NotIn => {
                if values.is_empty() {
                    return Err("for 'in', 'notin' operators, values set can't be empty".into());
                }
            }
            Operator::Equals | Operator::DoubleEquals | Operator::NotEquals => {
                if values.len() != 1 {
                    return Err("exact-match compatibility requires one single value".into());
                }
            }
            Operator::Exists | Operator::DoesNotExist => {
                if !values.is_empty() {
                    return Err("values set must be empty for exists and does not exist".into());
                }
            }
            Operator::GreaterThan | Operator::LessThan => {
                if values.len() != 1 {
                    return Err("for 'Gt', 'Lt' operators, exactly one value is required".into());
                }
                if values.iter().any(|v| v.parse::<i64>().is_err()) {
                    return Err("for 'Gt', 'Lt' operators, the value must be an integer".into());
                }
            }
        }
        for v in &values {
            check_value(key, v)?;
        }
        values.sort();
        values.dedup();
        Ok(Requirement {
            key: key.to_string(),
            op,
            values,
        })
    }

    fn has_value(&self, v: &str) -> bool {
        self.values.binary_search_by(|x| x.as_str().cmp(v)).is_ok()
    }

    /// `label` is the object's value for `self.key`, `None` when absent.
    fn matches(&self, label: Option<&str>) -> bool {
        match self.op {
            Operator::In | Operator::Equals | Operator::DoubleEquals => {
                label.is_some_and(|v| self.has_value(v))
            }
            // Absent keys satisfy negative requirements, as in Kubernetes.
            Operator::NotIn | Operator::NotEquals => match label {
                Some(v) => !self.has_value(v),
                None => true,
            },
            Operator::Exists => label.is_some(),
            Operator::DoesNotExist => label.is_none(),
            Operator::GreaterThan | Operator::LessThan => {
                let Some(Ok(have)) = label.map(|v| v.parse::<i64>()) else {
                    return false;
                };
                let Some(Ok(want)) = self.values.first().map(|v| v.parse::<i64>()) else {
                    return false;
                };
                if self.op == Operator::GreaterThan {
                    have > want
                } else {
                    have < want
                }
            }
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let single = || self.values.first().map(String::as_str).unwrap_or("");
        match self.op {
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
            Operator::Equals => write!(f, "{}={}", self.key, single()),
            Operator::DoubleEquals => write!(f, "{}=={}", self.key, single()),
            Operator::NotEquals => write!(f, "{}!={}", self.key, single()),
            Operator::GreaterThan => write!(f, "{}>{}", self.key, single()),
            Operator::LessThan => write!(f, "{}<{}", self.key, single()),
            Operator::In => write!(f, "{} in ({})", self.key, self.values.join(",")),
            Operator::NotIn => write!(f, "{} notin ({})", self.key, self.values.join(",")),
        }
    }
}

// ---------------------------------------------------------------------------
// Label selector lexer and parser
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    End,
    Ident(&'a str),
    In,
    NotIn,
    Bang,
    NotEquals,
    Equals,
    DoubleEquals,
    Greater,
    Less,
    Open,
    Close,
    Comma,
}

impl Token<'_> {
    /// The source text of the token, for error messages.
    fn literal(&self) -> &str {
        match self {
            Token::End => "",
            Token::Ident(s) => s,
            Token::In => "in",
            Token::NotIn => "notin",
            Token::Bang => "!",
            Token::NotEquals => "!=",
            Token::Equals => "=",
            Token::DoubleEquals => "==",
            Token::Greater => ">",
            Token::Less => "<",
            Token::Open => "(",
            Token::Close => ")",
            Token::Comma => ",",
        }
    }
}

fn is_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn is_special(b: u8) -> bool {
    matches!(b, b'=' | b'!' | b'(' | b')' | b',' | b'>' | b'<')
}

/// Splits a selector into tokens; the last token is always [`Token::End`].
///
/// Identifiers are maximal runs of bytes that are neither whitespace nor
/// special symbols; both of those are ASCII, so slicing there keeps UTF-8
/// boundaries intact (non-ASCII identifiers are rejected later by validation).
fn lex(s: &str) -> Vec<Token<'_>> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    loop {
        while i < b.len() && is_whitespace(b[i]) {
            i += 1;
        }
        if i >= b.len() {
            out.push(Token::End);
            return out;
        }
        if is_special(b[i]) {
            let next = b.get(i + 1).copied();
            let (tok, len) = match (b[i], next) {
                (b'!', Some(b'=')) => (Token::NotEquals, 2),
                (b'=', Some(b'=')) => (Token::DoubleEquals, 2),
                (b'!', _) => (Token::Bang, 1),
                (b'=', _) => (Token::Equals, 1),
                (b'>', _) => (Token::Greater, 1),
                (b'<', _) => (Token::Less, 1),
                (b'(', _) => (Token::Open, 1),
                (b')', _) => (Token::Close, 1),
                _ => (Token::Comma, 1),
            };
            out.push(tok);
            i += len;
        } else {
            let start = i;
            while i < b.len() && !is_special(b[i]) && !is_whitespace(b[i]) {
                i += 1;
            }
            out.push(match &s[start..i] {
                "in" => Token::In,
                "notin" => Token::NotIn,
                word => Token::Ident(word),
            });
        }
    }
}

/// Whether `in`/`notin` are operators (after a key) or plain identifiers
/// (keys and values), so `in in (notin)` parses as key `in`, value `notin`.
#[derive(Clone, Copy)]
enum Ctx {
    KeyAndOperator,
    Values,
}

struct Parser<'a> {
    tokens: Vec<Token<'a>>,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn in_ctx(tok: Token<'a>, ctx: Ctx) -> Token<'a> {
        match (ctx, tok) {
            (Ctx::Values, Token::In) => Token::Ident("in"),
            (Ctx::Values, Token::NotIn) => Token::Ident("notin"),
            _ => tok,
        }
    }

    fn peek(&self, ctx: Ctx) -> Token<'a> {
        Self::in_ctx(self.tokens[self.pos], ctx)
    }

    /// Returns the current token and advances (never past [`Token::End`]).
    fn next(&mut self, ctx: Ctx) -> Token<'a> {
        let tok = self.peek(ctx);
        if self.pos + 1 < self.tokens.len() {
            self.pos += 1;
        }
        tok
    }

    fn parse(&mut self) -> Result<Vec<Requirement>, String> {
        let mut reqs = Vec::new();
        loop {
            match self.peek(Ctx::Values) {
                Token::Ident(_) | Token::Bang => {
                    let r = self
                        .parse_requirement()
                        .map_err(|e| format!("unable to parse requirement: {e}"))?;
                    reqs.push(r);
                    match self.next(Ctx::Values) {
                        Token::End => return Ok(reqs),
                        Token::Comma => {
                            let t = self.peek(Ctx::Values);
                            if !matches!(t, Token::Ident(_) | Token::Bang) {
                                return Err(format!(
                                    "found '{}', expected: identifier after ','",
                                    t.literal()
                                ));
                            }
                        }
                        t => {
                            return Err(format!(
                                "found '{}', expected: ',' or 'end of string'",
                                t.literal()
                            ))
                        }
                    }
                }
                Token::End => return Ok(reqs),
                t => {
                    return Err(format!(
                        "found '{}', expected: !, identifier, or 'end of string'",
                        t.literal()
                    ))
                }
            }
        }
    }

    fn parse_requirement(&mut self) -> Result<Requirement, String> {
        let (key, op) = self.parse_key_and_infer_operator()?;
        if let Some(op) = op {
            return Requirement::new(key, op, Vec::new());
        }
        let op = self.parse_operator()?;
        let values = match op {
            Operator::In | Operator::NotIn => self.parse_values()?,
            _ => self.parse_exact_value()?,
        };
        Requirement::new(key, op, values)
    }

    /// Reads `[!]key`; returns `Exists`/`DoesNotExist` when no binary
    /// operator follows, `None` when one does.
    fn parse_key_and_infer_operator(&mut self) -> Result<(&'a str, Option<Operator>), String> {
        let mut tok = self.next(Ctx::Values);
        let mut op = None;
        if tok == Token::Bang {
            op = Some(Operator::DoesNotExist);
            tok = self.next(Ctx::Values);
        }
        let Token::Ident(key) = tok else {
            return Err(format!("found '{}', expected: identifier", tok.literal()));
        };
        check_key(key)?;
        if op.is_none() && matches!(self.peek(Ctx::Values), Token::End | Token::Comma) {
            op = Some(Operator::Exists);
        }
        Ok((key, op))
    }

    fn parse_operator(&mut self) -> Result<Operator, String> {
        Ok(match self.next(Ctx::KeyAndOperator) {
            Token::In => Operator::In,
            Token::NotIn => Operator::NotIn,
            Token::Equals => Operator::Equals,
            Token::DoubleEquals => Operator::DoubleEquals,
            Token::NotEquals => Operator::NotEquals,
            Token::Greater => Operator::GreaterThan,
            Token::Less => Operator::LessThan,
            t => {
                return Err(format!(
                    "found '{}', expected: in, notin, =, ==, !=, gt, lt",
                    t.literal()
                ))
            }
        })
    }

    /// `( v1, v2, ... )`. Empty entries are the empty string; like
    /// Kubernetes, `()` is the set containing only `""`.
    fn parse_values(&mut self) -> Result<Vec<String>, String> {
        let t = self.next(Ctx::Values);
        if t != Token::Open {
            return Err(format!("found '{}', expected: '('", t.literal()));
        }
        match self.peek(Ctx::Values) {
            Token::Ident(_) | Token::Comma => {
                let values = self.parse_identifiers_list()?;
                match self.next(Ctx::Values) {
                    Token::Close => Ok(values),
                    t => Err(format!("found '{}', expected: ')'", t.literal())),
                }
            }
            Token::Close => {
                self.next(Ctx::Values);
                Ok(vec![String::new()])
            }
            t => Err(format!(
                "found '{}', expected: ',', ')' or identifier",
                t.literal()
            )),
        }
    }

    /// The inside of `( ... )`, stopping before the closing parenthesis.
    fn parse_identifiers_list(&mut self) -> Result<Vec<String>, String> {
        let mut values: Vec<String> = Vec::new();
        loop {
            match self.next(Ctx::Values) {
                Token::Ident(v) => {
                    values.push(v.to_string());
                    match self.peek(Ctx::Values) {
                        Token::Comma => continue,
                        Token::Close => return Ok(values),
                        t => return Err(format!("found '{}', expected: ',' or ')'", t.literal())),
                    }
                }
                Token::Comma => {
                    // "(," -- an empty first value
                    if values.is_empty() {
                        values.push(String::new());
                    }
                    match self.peek(Ctx::Values) {
                        // ",)" -- an empty last value
                        Token::Close => {
                            values.push(String::new());
                            return Ok(values);
                        }
                        // ",," -- an empty value in between
                        Token::Comma => {
                            self.next(Ctx::Values);
                            values.push(String::new());
                        }
                        _ => {}
                    }
                }
                t => {
                    return Err(format!(
                        "found '{}', expected: ',', or identifier",
                        t.literal()
                    ))
                }
            }
        }
    }

    /// The single value after `=`, `==`, `!=`, `>` or `<`; missing means `""`.
    fn parse_exact_value(&mut self) -> Result<Vec<String>, String> {
        if matches!(self.peek(Ctx::Values), Token::End | Token::Comma) {
            return Ok(vec![String::new()]);
        }
        match self.next(Ctx::Values) {
            Token::Ident(v) => Ok(vec![v.to_string()]),
            t => Err(format!("found '{}', expected: identifier", t.literal())),
        }
    }
}

// ---------------------------------------------------------------------------
// LabelSelector
// ---------------------------------------------------------------------------

/// A parsed label selector: the AND of its requirements.
///
/// One type for every way Kubernetes expresses label selection (query
/// strings, `metav1.LabelSelector`, plain maps), so list filtering, watch
/// filtering and controllers all share the same matching rules. The default
/// value is the empty selector, which matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector {
    /// Sorted by key (stable), mirroring Kubernetes' canonical order.
    requirements: Vec<Requirement>,
    /// A null `metav1.LabelSelector`, which Kubernetes treats as selecting
    /// nothing (`labels.Nothing()`).
    nothing: bool,
}

impl LabelSelector {
    /// Parses the `labelSelector` query-string syntax, e.g.
    /// `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    ///
    /// Accepts `=`, `==`, `!=`, `in`, `notin`, bare `key` (exists), `!key`
    /// (does not exist) and the integer comparisons `key>n` / `key<n`, with
    /// whitespace allowed between tokens. Keys and values are validated. The
    /// empty (or all-whitespace) string selects everything. As in
    /// Kubernetes, `key=` compares against the empty value and `key in ()`
    /// is the same as `key in ("")`.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut parser = Parser {
            tokens: lex(s),
            pos: 0,
        };
        let requirements = parser.parse().map_err(SelectorError::Invalid)?;
        Ok(Self::from_requirements(requirements))
    }

    /// Converts a `metav1.LabelSelector` JSON value (`matchLabels` and
    /// `matchExpressions` with operators `In`, `NotIn`, `Exists`,
    /// `DoesNotExist`), as embedded in workload and policy specs.
    ///
    /// Follows `metav1.LabelSelectorAsSelector`: `{}` (or both fields empty)
    /// selects everything, while JSON `null` selects nothing. `In`/`NotIn`
    /// need at least one value and `Exists`/`DoesNotExist` must have none.
    pub fn from_json(v: &Value) -> Result<Self, SelectorError> {
        let obj = match v {
            Value::Null => {
                return Ok(LabelSelector {
                    requirements: Vec::new(),
                    nothing: true,
                })
            }
            Value::Object(obj) => obj,
            _ => return Err(invalid("label selector must be a JSON object")),
        };
        let mut requirements = Vec::new();
        match obj.get("matchLabels") {
            None | Some(Value::Null) => {}
            Some(Value::Object(labels)) => {
                for (k, v) in labels {
                    let Some(v) = v.as_str() else {
                        return Err(invalid(format!(
                            "matchLabels[{k:?}]: label value must be a string"
                        )));
                    };
                    requirements.push(
                        Requirement::new(k, Operator::Equals, vec![v.to_string()])
                            .map_err(SelectorError::Invalid)?,
                    );
                }
            }
            Some(_) => return Err(invalid("matchLabels must be an object")),
        }
        match obj.get("matchExpressions") {
            None | Some(Value::Null) => {}
            Some(Value::Array(exprs)) => {
                for (i, expr) in exprs.iter().enumerate() {
                    requirements.push(Self::expression_from_json(i, expr)?);
                }
            }
            Some(_) => return Err(invalid("matchExpressions must be an array")),
        }
        Ok(Self::from_requirements(requirements))
    }

    fn expression_from_json(i: usize, expr: &Value) -> Result<Requirement, SelectorError> {
        let Some(expr) = expr.as_object() else {
            return Err(invalid(format!("matchExpressions[{i}] must be an object")));
        };
        let key = match expr.get("key") {
            None | Some(Value::Null) => "",
            Some(Value::String(k)) => k.as_str(),
            Some(_) => {
                return Err(invalid(format!(
                    "matchExpressions[{i}].key must be a string"
                )))
            }
        };
        let op = match expr.get("operator") {
            Some(Value::String(op)) => match op.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(invalid(format!(
                        "{other:?} is not a valid label selector operator"
                    )))
                }
            },
            None | Some(Value::Null) => {
                return Err(invalid(format!(
                    "matchExpressions[{i}].operator is required"
                )))
            }
            Some(_) => {
                return Err(invalid(format!(
                    "matchExpressions[{i}].operator must be a string"
                )))
            }
        };
        let values = match expr.get("values") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(vals)) => vals
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    invalid(format!(
                        "matchExpressions[{i}].values must be an array of strings"
                    ))
                })?,
            Some(_) => {
                return Err(invalid(format!(
                    "matchExpressions[{i}].values must be an array of strings"
                )))
            }
        };
        Requirement::new(key, op, values).map_err(SelectorError::Invalid)
    }

    /// Builds an equality selector from a plain map, as used by
    /// `Service.spec.selector` and `ReplicationController.spec.selector`.
    ///
    /// Every pair must be present with an equal value; an empty map selects
    /// everything (callers that treat an absent selector specially must check
    /// that themselves). Like Kubernetes' `SelectorFromSet` the pairs are not
    /// validated, which is why this cannot fail. Non-string values (which
    /// API validation should have rejected) are compared by their JSON text,
    /// with `null` meaning `""`.
    pub fn from_map(m: &Map<String, Value>) -> Self {
        let requirements = m
            .iter()
            .map(|(k, v)| Requirement {
                key: k.clone(),
                op: Operator::Equals,
                values: vec![match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                }],
            })
            .collect();
        Self::from_requirements(requirements)
    }

    fn from_requirements(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort_by(|a, b| a.key.cmp(&b.key));
        LabelSelector {
            requirements,
            nothing: false,
        }
    }

    /// True when the selector places no restriction (matches every object),
    /// so callers can skip filtering entirely.
    ///
    /// A selector from a JSON `null` matches nothing and is not empty.
    pub fn is_empty(&self) -> bool {
        !self.nothing && self.requirements.is_empty()
    }

    /// Matches against an object's `metadata.labels` (a JSON object, or
    /// `None`/`null` for an object without labels).
    ///
    /// Label entries whose value is not a string are treated as absent.
    pub fn matches(&self, labels: Option<&Value>) -> bool {
        let map = labels.and_then(Value::as_object);
        self.matches_pairs(|k| map.and_then(|m| m.get(k)).and_then(Value::as_str))
    }

    /// Matches against labels available through a lookup function, for
    /// callers whose labels are not stored as JSON (e.g. typed structs or
    /// a `BTreeMap`). `labels(key)` returns the value, or `None` if absent.
    pub fn matches_pairs<'a>(&self, labels: impl Fn(&str) -> Option<&'a str>) -> bool {
        !self.nothing && self.requirements.iter().all(|r| r.matches(labels(&r.key)))
    }
}

/// Canonical string form (requirements sorted by key, set values sorted),
/// which [`LabelSelector::parse`] accepts back; used for logging, for
/// comparing selectors and for echoing them in responses.
impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// FieldSelector
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldOp {
    /// `=` or `==` (Kubernetes does not distinguish them).
    Equals,
    /// `!=`
    NotEquals,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldTerm {
    field: String,
    op: FieldOp,
    /// Unescaped.
    value: String,
}

/// A parsed field selector: the AND of `field=value` / `field!=value` terms.
///
/// Used to filter list and watch results by `fieldSelector`. It knows nothing
/// about which fields a resource supports: the caller checks
/// [`FieldSelector::fields`] against the kind's allowed list and supplies
/// the values through [`FieldSelector::matches`]. The default value is the
/// empty selector, which matches everything.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector {
    terms: Vec<FieldTerm>,
}

/// Splits on commas that are not escaped with a backslash.
fn split_field_terms(s: &str) -> Vec<&str> {
    if s.is_empty() {
        return Vec::new();
    }
    let mut terms = Vec::new();
    let mut start = 0;
    let mut in_slash = false;
    for (i, c) in s.char_indices() {
        if in_slash {
            in_slash = false;
        } else if c == '\\' {
            in_slash = true;
        } else if c == ',' {
            terms.push(&s[start..i]);
            start = i + 1;
        }
    }
    terms.push(&s[start..]);
    terms
}

/// Splits a term at the first operator, trying `!=`, `==`, `=` at each
/// position, so `a==b` is `a` `==` `b` and not `a` `=` `=b`.
fn split_field_term(term: &str) -> Option<(&str, FieldOp, &str)> {
    for (i, _) in term.char_indices() {
        let rest = &term[i..];
        for (text, op) in [
            ("!=", FieldOp::NotEquals),
            ("==", FieldOp::Equals),
            ("=", FieldOp::Equals),
        ] {
            if let Some(value) = rest.strip_prefix(text) {
                return Some((&term[..i], op, value));
            }
        }
    }
    None
}

/// Resolves `\\`, `\,` and `\=`; any other escape, a trailing backslash, or
/// an unescaped `,`/`=` is an error.
fn unescape_field_value(s: &str) -> Result<String, SelectorError> {
    let mut out = String::with_capacity(s.len());
    let mut in_slash = false;
    for c in s.chars() {
        if in_slash {
            match c {
                '\\' | ',' | '=' => out.push(c),
                _ => {
                    return Err(invalid(format!(
                        "invalid field selector: invalid escape sequence: \\{c}"
                    )))
                }
            }
            in_slash = false;
            continue;
        }
        match c {
            '\\' => in_slash = true,
            ',' | '=' => {
                return Err(invalid(format!(
                    "invalid field selector: unescaped character in value: '{c}'"
                )))
            }
            _ => out.push(c),
        }
    }
    if in_slash {
        return Err(invalid(
            "invalid field selector: invalid escape sequence: \\",
        ));
    }
    Ok(out)
}

fn escape_field_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '\\' | ',' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl FieldSelector {
    /// Parses the `fieldSelector` query-string syntax, e.g.
    /// `metadata.name=x,spec.nodeName!=y`.
    ///
    /// Operators are `=`, `==` (same meaning) and `!=`. Values may contain
    /// `\,`, `\=` and `\\`; unescaped `,`/`=` in a value are errors. Empty
    /// terms (e.g. a trailing comma) are ignored and the empty string
    /// selects everything. Field names are taken verbatim (no trimming),
    /// exactly as Kubernetes does, and are not checked here.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let parts = split_field_terms(s);
        let mut terms = Vec::new();
        for part in parts {
            if part.is_empty() {
                continue;
            }
            let Some((field, op, raw)) = split_field_term(part) else {
                return Err(invalid(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            terms.push(FieldTerm {
                field: field.to_string(),
                op,
                value: unescape_field_value(raw)?,
            });
        }
        // Sorted by the canonical form of each term (not by the text as
        // written, where `a==` and `a=\x17` sort the other way round), so
        // printing and parsing again gives the same selector (found by
        // fuzzing).
        terms.sort_by_cached_key(FieldTerm::canonical);
        Ok(FieldSelector { terms })
    }

    /// True when the selector places no restriction, so callers can skip
    /// field lookups entirely.
    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    /// The distinct field names used, in order of first appearance, so the
    /// caller can reject fields the resource kind does not support (400,
    /// `field label not supported: ...`).
    pub fn fields(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for t in &self.terms {
            if !out.contains(&t.field.as_str()) {
                out.push(&t.field);
            }
        }
        out
    }

    /// Matches an object whose field values are provided by `get`; a field
    /// for which `get` returns `None` compares as the empty string (so
    /// `spec.nodeName=` selects unscheduled pods).
    pub fn matches(&self, get: &dyn Fn(&str) -> Option<String>) -> bool {
        self.terms.iter().all(|t| {
            let have = get(&t.field).unwrap_or_default();
            match t.op {
                FieldOp::Equals => have == t.value,
                FieldOp::NotEquals => have != t.value,
            }
        })
    }

    /// The value `field` is required to equal (`=` or `==`), if any, so a
    /// list can jump straight to one object by `metadata.name` or one
    /// namespace by `metadata.namespace`.
    ///
    /// Only a shortcut: if several terms pin the same field, the first is
    /// returned, so callers must still run [`FieldSelector::matches`].
    pub fn exact(&self, field: &str) -> Option<&str> {
        self.terms
            .iter()
            .find(|t| t.op == FieldOp::Equals && t.field == field)
            .map(|t| t.value.as_str())
    }
}

/// Canonical string form (terms sorted, `==` written as `=`, values
/// re-escaped), which [`FieldSelector::parse`] accepts back; for logging and
/// comparing selectors.
impl fmt::Display for FieldSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(&t.canonical())?;
        }
        Ok(())
    }
}

impl FieldTerm {
    /// `field=value` or `field!=value`, the value re-escaped.
    fn canonical(&self) -> String {
        let op = match self.op {
            FieldOp::Equals => "=",
            FieldOp::NotEquals => "!=",
        };
        format!("{}{}{}", self.field, op, escape_field_value(&self.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("parse {s:?}: {e}"))
    }

    fn err(s: &str) -> String {
        match LabelSelector::parse(s) {
            Ok(v) => panic!("parse {s:?} should fail, got {v:?}"),
            Err(SelectorError::Invalid(m)) => m,
        }
    }

    fn m(s: &LabelSelector, labels: Value) -> bool {
        s.matches(Some(&labels))
    }

    // ---- validation -------------------------------------------------------

    #[test]
    fn label_key_validation() {
        for ok in [
            "a",
            "A",
            "app",
            "app.kubernetes.io/name",
            "example.com/MyName",
            "my.name",
            "123-abc",
            "a_b",
            "k8s.io/a-b_c.d",
            &"x".repeat(63),
            &format!("{}/n", "a".repeat(253)),
        ] {
            assert_eq!(validate_label_key(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "_a",
            "a.",
            "a b",
            "a/b/c",
            "/a",
            "a/",
            "Example.com/a",
            "exa_mple.com/a",
            "-example.com/a",
            "example..com/a",
            "ä",
            &"x".repeat(64),
            &format!("{}/n", "a".repeat(254)),
        ] {
            assert!(
                validate_label_key(bad).is_err(),
                "{bad:?} should be invalid"
            );
        }
        let e = validate_label_key("/").unwrap_err();
        assert!(e.contains("prefix part must be non-empty"), "{e}");
        assert!(e.contains("name part must be non-empty"), "{e}");
        let e = validate_label_key(&"x".repeat(64)).unwrap_err();
        assert!(
            e.contains("name part must be no more than 63 characters"),
            "{e}"
        );
        let e = validate_label_key("a b").unwrap_err();
        assert!(
            e.starts_with("name part must consist of alphanumeric characters"),
            "{e}"
        );
        assert!(
            e.contains("regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]'"),
            "{e}"
        );
        let e = validate_label_key("a/b/c").unwrap_err();
        assert!(e.starts_with("a qualified name must consist of"), "{e}");
        let e = validate_label_key("Foo.com/x").unwrap_err();
        assert!(
            e.starts_with("prefix part a lowercase RFC 1123 subdomain"),
            "{e}"
        );
    }

    #[test]
    fn label_value_validation() {
        for ok in ["", "a", "A-b_c.d", "12345", &"v".repeat(63)] {
            assert_eq!(validate_label_value(ok), Ok(()), "{ok}");
        }
        for bad in ["-a", "a-", ".", "a b", "a/b", "é", &"v".repeat(64)] {
            assert!(
                validate_label_value(bad).is_err(),
                "{bad:?} should be invalid"
            );
        }
        let e = validate_label_value(&"v".repeat(64)).unwrap_err();
        assert_eq!(e, "must be no more than 63 characters");
        let e = validate_label_value("-a").unwrap_err();
        assert!(
            e.starts_with("a valid label must be an empty string"),
            "{e}"
        );
        assert!(
            e.contains("(e.g. 'MyValue', or 'my_value', or '12345', "),
            "{e}"
        );
    }

    // ---- label selector parsing and matching ------------------------------

    #[test]
    fn empty_selector_matches_everything() {
        for s in ["", " ", "\t\n "] {
            let l = sel(s);
            assert!(l.is_empty());
            assert_eq!(l, LabelSelector::default());
            assert_eq!(l.to_string(), "");
            assert!(l.matches(None));
            assert!(l.matches(Some(&Value::Null)));
            assert!(m(&l, json!({"a": "b"})));
        }
    }

    #[test]
    fn equality_operators() {
        for s in ["a=b", "a==b", " a = b ", "a==  b"] {
            let l = sel(s);
            assert!(!l.is_empty());
            assert!(m(&l, json!({"a": "b"})), "{s}");
            assert!(m(&l, json!({"a": "b", "c": "d"})), "{s}");
            assert!(!m(&l, json!({"a": "c"})), "{s}");
            assert!(!m(&l, json!({})), "{s}");
            assert!(!l.matches(None), "{s}");
        }
        let l = sel("a!=b");
        assert!(!m(&l, json!({"a": "b"})));
        assert!(m(&l, json!({"a": "c"})));
        assert!(m(&l, json!({})), "!= matches when the key is absent");
        assert!(l.matches(None));
    }

    #[test]
    fn empty_exact_value() {
        let l = sel("a=");
        assert_eq!(l.to_string(), "a=");
        assert!(m(&l, json!({"a": ""})));
        assert!(!m(&l, json!({"a": "x"})));
        assert!(!m(&l, json!({})));
        let l = sel("a!=,b");
        assert_eq!(l.to_string(), "a!=,b");
        assert!(m(&l, json!({"a": "x", "b": "y"})));
        assert!(!m(&l, json!({"a": "", "b": "y"})));
    }

    #[test]
    fn set_operators() {
        let l = sel("env in (prod, staging)");
        assert!(m(&l, json!({"env": "prod"})));
        assert!(m(&l, json!({"env": "staging"})));
        assert!(!m(&l, json!({"env": "dev"})));
        assert!(!m(&l, json!({})));

        let l = sel("env notin (prod,staging)");
        assert!(!m(&l, json!({"env": "prod"})));
        assert!(m(&l, json!({"env": "dev"})));
        assert!(m(&l, json!({})), "notin matches when the key is absent");

        // No whitespace needed around the parenthesis.
        let l = sel("env in(a,b)");
        assert!(m(&l, json!({"env": "a"})));
        let l = sel("env notin(a)");
        assert!(m(&l, json!({"env": "b"})));
    }

    #[test]
    fn existence_operators() {
        let l = sel("a");
        assert!(m(&l, json!({"a": ""})));
        assert!(m(&l, json!({"a": "x"})));
        assert!(!m(&l, json!({"b": "x"})));
        let l = sel("!a");
        assert!(!m(&l, json!({"a": ""})));
        assert!(m(&l, json!({"b": "x"})));
        assert!(l.matches(None));
        let l = sel(" ! a ");
        assert_eq!(l.to_string(), "!a");
    }

    #[test]
    fn combined_requirements_are_anded() {
        let l = sel("a=b,c!=d,e in (x,y),f notin (z),g,!h");
        let good = json!({"a": "b", "c": "x", "e": "y", "f": "w", "g": ""});
        assert!(m(&l, good.clone()));
        let mut obj = good.as_object().unwrap().clone();
        obj.insert("h".into(), json!("1"));
        assert!(!m(&l, Value::Object(obj)));
        for (k, v) in [("a", "c"), ("c", "d"), ("e", "z"), ("f", "z")] {
            let mut obj = good.as_object().unwrap().clone();
            obj.insert(k.into(), json!(v));
            assert!(!m(&l, Value::Object(obj)), "{k}={v}");
        }
        let mut obj = good.as_object().unwrap().clone();
        obj.remove("g");
        assert!(!m(&l, Value::Object(obj)));
        // Absent keys satisfy != and notin.
        assert!(m(&l, json!({"a": "b", "e": "x", "g": "1"})));
    }

    #[test]
    fn whitespace_tolerated() {
        let a = sel("a=b,c in (x,y),!d,e");
        let b = sel("  a = b ,\tc  in  ( x , y ) , ! d ,\n e  ");
        assert_eq!(a, b);
    }

    #[test]
    fn keywords_are_identifiers_in_key_and_value_position() {
        let l = sel("in=notin");
        assert!(m(&l, json!({"in": "notin"})));
        let l = sel("x in (in,notin)");
        assert!(m(&l, json!({"x": "in"})));
        assert!(m(&l, json!({"x": "notin"})));
        let l = sel("notin notin (in)");
        assert!(m(&l, json!({"notin": "x"})));
        assert!(!m(&l, json!({"notin": "in"})));
        let l = sel("in");
        assert!(m(&l, json!({"in": "1"})));
        let l = sel("!notin");
        assert!(m(&l, json!({})));
        let l = sel("a=in");
        assert!(m(&l, json!({"a": "in"})));
    }

    #[test]
    fn empty_values_in_sets() {
        // Kubernetes: `()` is the set {""}, and empty entries are "".
        let l = sel("a in ()");
        assert_eq!(l.to_string(), "a in ()");
        assert!(m(&l, json!({"a": ""})));
        assert!(!m(&l, json!({"a": "x"})));
        assert!(!m(&l, json!({})));
        assert_eq!(sel("a in (,b)").to_string(), "a in (,b)");
        assert_eq!(sel("a in (b,)").to_string(), "a in (,b)");
        assert_eq!(sel("a in (b,,c)").to_string(), "a in (,b,c)");
        assert_eq!(sel("a in (,)").to_string(), "a in ()");
        let l = sel("a notin (b,)");
        assert!(!m(&l, json!({"a": ""})));
        assert!(m(&l, json!({"a": "c"})));
    }

    #[test]
    fn qualified_keys() {
        let l = sel("app.kubernetes.io/name=web,!example.com/skip");
        assert!(m(&l, json!({"app.kubernetes.io/name": "web"})));
        assert!(!m(
            &l,
            json!({"app.kubernetes.io/name": "web", "example.com/skip": "1"})
        ));
    }

    #[test]
    fn numeric_comparisons() {
        let gt = sel("replicas>5");
        assert!(m(&gt, json!({"replicas": "6"})));
        assert!(!m(&gt, json!({"replicas": "5"})));
        assert!(!m(&gt, json!({"replicas": "x"})));
        assert!(!m(&gt, json!({})));
        let lt = sel("n < 10");
        assert_eq!(lt.to_string(), "n<10");
        assert!(m(&lt, json!({"n": "9"})));
        assert!(!m(&lt, json!({"n": "10"})));
        assert!(err("a>x").contains("the value must be an integer"));
        assert!(err("a<").contains("the value must be an integer"));
    }

    #[test]
    fn canonical_string_form_round_trips() {
        let l = sel("z=1, b in (y,x,x), !c, a, d==2, e notin (q), f!=3");
        let s = l.to_string();
        assert_eq!(s, "a,b in (x,y),!c,d==2,e notin (q),f!=3,z=1");
        assert_eq!(sel(&s), l);
        assert_eq!(sel(&s).to_string(), s);
        // Value order and duplicates do not matter.
        assert_eq!(sel("a in (x,y)"), sel("a in (y,x,y)"));
    }

    #[test]
    fn parse_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "a in",
                "unable to parse requirement: found '', expected: '('",
            ),
            (
                "a in (b",
                "unable to parse requirement: found '', expected: ',' or ')'",
            ),
            (
                "a in (b c)",
                "unable to parse requirement: found 'c', expected: ',' or ')'",
            ),
            (
                "a in b",
                "unable to parse requirement: found 'b', expected: '('",
            ),
            (
                "a in (=)",
                "unable to parse requirement: found '=', expected: ',', ')' or identifier",
            ),
            (
                "a in (,=)",
                "unable to parse requirement: found '=', expected: ',', or identifier",
            ),
            (
                "a b",
                "unable to parse requirement: found 'b', expected: in, notin, =, ==, !=, gt, lt",
            ),
            (
                "a (b)",
                "unable to parse requirement: found '(', expected: in, notin, =, ==, !=, gt, lt",
            ),
            (
                "a=(b)",
                "unable to parse requirement: found '(', expected: identifier",
            ),
            ("a=b c", "found 'c', expected: ',' or 'end of string'"),
            ("a=b=c", "found '=', expected: ',' or 'end of string'"),
            ("!a=b", "found '=', expected: ',' or 'end of string'"),
            ("a=b,", "found '', expected: identifier after ','"),
            ("a=b,,c", "found ',', expected: identifier after ','"),
            (
                "=a",
                "found '=', expected: !, identifier, or 'end of string'",
            ),
            (
                ",a",
                "found ',', expected: !, identifier, or 'end of string'",
            ),
            (
                "(a)",
                "found '(', expected: !, identifier, or 'end of string'",
            ),
            (
                "!",
                "unable to parse requirement: found '', expected: identifier",
            ),
            (
                "!!a",
                "unable to parse requirement: found '!', expected: identifier",
            ),
            (
                "!=a",
                "found '!=', expected: !, identifier, or 'end of string'",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(&err(input), want, "input {input:?}");
        }
    }

    #[test]
    fn invalid_keys_and_values_are_rejected() {
        let e = err("a_=b");
        assert!(
            e.starts_with("unable to parse requirement: invalid label key \"a_\": name part"),
            "{e}"
        );
        let e = err("-a");
        assert!(e.contains("invalid label key \"-a\""), "{e}");
        let e = err("a/b/c=x");
        assert!(e.contains("invalid label key \"a/b/c\""), "{e}");
        let e = err("a=-b");
        assert!(
            e.starts_with("unable to parse requirement: invalid label value: \"-b\": at key: \"a\": a valid label"),
            "{e}"
        );
        let long = "v".repeat(64);
        let e = err(&format!("a in (x,{long})"));
        assert!(e.contains("must be no more than 63 characters"), "{e}");
        assert!(err("a=\"b\"").contains("invalid label value"));
        assert!(err("a=b/c").contains("invalid label value"));
        assert!(err("a=é").contains("invalid label value"));
        // Errors are single-line.
        for s in ["a_=b", "a in (", "a=-b", "a b"] {
            assert!(!err(s).contains('\n'), "{s}");
        }
    }

    #[test]
    fn error_type_displays_message() {
        let e = LabelSelector::parse("a in").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unable to parse requirement: found '', expected: '('"
        );
        assert_eq!(e.clone(), e);
    }

    #[test]
    fn non_string_or_missing_labels() {
        let l = sel("a=1");
        assert!(
            !m(&l, json!({"a": 1})),
            "non-string label values are absent"
        );
        assert!(m(&sel("!a"), json!({"a": 1})));
        assert!(!m(&l, json!(["a"])));
        assert!(!l.matches(Some(&Value::Null)));
        assert!(sel("a!=1").matches(Some(&json!("not an object"))));
    }

    #[test]
    fn matches_pairs_with_other_maps() {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_string(), "web".to_string());
        labels.insert("tier".to_string(), "front".to_string());
        let get = |k: &str| labels.get(k).map(String::as_str);
        assert!(sel("app=web,tier in (front,back)").matches_pairs(get));
        assert!(!sel("app=web,!tier").matches_pairs(get));
        assert!(sel("").matches_pairs(|_| None));
    }

    // ---- metav1.LabelSelector ------------------------------------------------

    #[test]
    fn from_json_match_labels_and_expressions() {
        let v = json!({
            "matchLabels": {"app": "web", "tier": "front"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "staging"]},
                {"key": "track", "operator": "NotIn", "values": ["canary"]},
                {"key": "owner", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist", "values": []}
            ]
        });
        let l = LabelSelector::from_json(&v).unwrap();
        assert_eq!(
            l.to_string(),
            "app=web,env in (prod,staging),!legacy,owner,tier=front,track notin (canary)"
        );
        assert_eq!(l, sel(&l.to_string()));
        assert!(m(
            &l,
            json!({"app": "web", "tier": "front", "env": "prod", "owner": "me"})
        ));
        assert!(!m(
            &l,
            json!({"app": "web", "tier": "front", "env": "prod", "owner": "me", "track": "canary"})
        ));
        assert!(!m(
            &l,
            json!({"app": "web", "tier": "front", "env": "prod", "owner": "me", "legacy": "1"})
        ));
        assert!(!m(
            &l,
            json!({"app": "web", "tier": "front", "env": "prod"})
        ));
    }

    #[test]
    fn from_json_empty_and_null() {
        for v in [
            json!({}),
            json!({"matchLabels": {}}),
            json!({"matchLabels": null, "matchExpressions": []}),
        ] {
            let l = LabelSelector::from_json(&v).unwrap();
            assert!(l.is_empty(), "{v}");
            assert!(l.matches(None), "{v}");
        }
        let nothing = LabelSelector::from_json(&Value::Null).unwrap();
        assert!(!nothing.is_empty());
        assert!(!nothing.matches(None));
        assert!(!nothing.matches(Some(&json!({"a": "b"}))));
        assert!(!nothing.matches_pairs(|_| None));
        assert_ne!(nothing, LabelSelector::default());
    }

    #[test]
    fn from_json_errors() {
        let cases: &[(Value, &str)] = &[
            (json!("a=b"), "label selector must be a JSON object"),
            (json!({"matchLabels": []}), "matchLabels must be an object"),
            (
                json!({"matchLabels": {"a": 1}}),
                "matchLabels[\"a\"]: label value must be a string",
            ),
            (
                json!({"matchExpressions": {}}),
                "matchExpressions must be an array",
            ),
            (
                json!({"matchExpressions": ["x"]}),
                "matchExpressions[0] must be an object",
            ),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}),
                "\"Gt\" is not a valid label selector operator",
            ),
            (
                json!({"matchExpressions": [{"key": "a"}]}),
                "matchExpressions[0].operator is required",
            ),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "In"}]}),
                "for 'in', 'notin' operators, values set can't be empty",
            ),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]}),
                "for 'in', 'notin' operators, values set can't be empty",
            ),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
                "values set must be empty for exists and does not exist",
            ),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "In", "values": [1]}]}),
                "matchExpressions[0].values must be an array of strings",
            ),
            (
                json!({"matchExpressions": [{"key": 5, "operator": "Exists"}]}),
                "matchExpressions[0].key must be a string",
            ),
        ];
        for (v, want) in cases {
            assert_eq!(
                LabelSelector::from_json(v),
                Err(SelectorError::Invalid(want.to_string())),
                "{v}"
            );
        }
        let e = LabelSelector::from_json(&json!({"matchLabels": {"a b": "c"}})).unwrap_err();
        assert!(
            e.to_string().starts_with("invalid label key \"a b\""),
            "{e}"
        );
        let e = LabelSelector::from_json(&json!({"matchLabels": {"a": "c d"}})).unwrap_err();
        assert!(
            e.to_string().starts_with("invalid label value: \"c d\""),
            "{e}"
        );
        let e = LabelSelector::from_json(&json!({"matchExpressions": [{"operator": "Exists"}]}))
            .unwrap_err();
        assert!(e.to_string().starts_with("invalid label key \"\""), "{e}");
    }

    #[test]
    fn from_map_requires_every_pair() {
        let map = json!({"app": "web", "tier": "front"});
        let l = LabelSelector::from_map(map.as_object().unwrap());
        assert_eq!(l.to_string(), "app=web,tier=front");
        assert!(m(&l, json!({"app": "web", "tier": "front", "x": "y"})));
        assert!(!m(&l, json!({"app": "web"})));
        assert!(!m(&l, json!({"app": "web", "tier": "back"})));
        let empty = LabelSelector::from_map(&Map::new());
        assert!(empty.is_empty());
        assert!(empty.matches(None));
        let odd = LabelSelector::from_map(json!({"n": 1, "z": null}).as_object().unwrap());
        assert!(m(&odd, json!({"n": "1", "z": ""})));
    }

    // ---- field selectors -----------------------------------------------------

    fn fsel(s: &str) -> FieldSelector {
        FieldSelector::parse(s).unwrap_or_else(|e| panic!("parse {s:?}: {e}"))
    }

    fn fields_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn field_selector_empty() {
        let f = fsel("");
        assert!(f.is_empty());
        assert_eq!(f, FieldSelector::default());
        assert!(f.fields().is_empty());
        assert!(f.matches(&|_| None));
        assert_eq!(f.to_string(), "");
        assert!(fsel(",").is_empty());
    }

    #[test]
    fn field_selector_operators() {
        let f = fsel("metadata.name=x,spec.nodeName!=y");
        assert!(!f.is_empty());
        assert_eq!(f.fields(), vec!["metadata.name", "spec.nodeName"]);
        assert!(f.matches(&fields_of(&[
            ("metadata.name", "x"),
            ("spec.nodeName", "z")
        ])));
        assert!(f.matches(&fields_of(&[("metadata.name", "x")])));
        assert!(!f.matches(&fields_of(&[
            ("metadata.name", "x"),
            ("spec.nodeName", "y")
        ])));
        assert!(!f.matches(&fields_of(&[("metadata.name", "w")])));

        let f = fsel("metadata.name==x");
        assert_eq!(f, fsel("metadata.name=x"));
        assert_eq!(f.exact("metadata.name"), Some("x"));
        assert!(f.matches(&fields_of(&[("metadata.name", "x")])));
    }

    #[test]
    fn field_selector_missing_field_is_empty_string() {
        let f = fsel("spec.nodeName=");
        assert!(f.matches(&|_| None));
        assert!(!f.matches(&fields_of(&[("spec.nodeName", "n1")])));
        let f = fsel("spec.nodeName!=");
        assert!(!f.matches(&|_| None));
        assert!(f.matches(&fields_of(&[("spec.nodeName", "n1")])));
    }

    #[test]
    fn field_selector_escapes() {
        let f = fsel(r"a=x\,y,b=p\=q,c=back\\slash");
        assert_eq!(f.fields(), vec!["a", "b", "c"]);
        assert_eq!(f.exact("a"), Some("x,y"));
        assert_eq!(f.exact("b"), Some("p=q"));
        assert_eq!(f.exact("c"), Some(r"back\slash"));
        assert_eq!(f.to_string(), r"a=x\,y,b=p\=q,c=back\\slash");
        assert_eq!(fsel(&f.to_string()), f);
        assert!(f.matches(&fields_of(&[
            ("a", "x,y"),
            ("b", "p=q"),
            ("c", r"back\slash")
        ])));
    }

    #[test]
    fn field_selector_errors() {
        let cases: &[(&str, &str)] = &[
            ("abc", "invalid selector: 'abc'; can't understand 'abc'"),
            ("a=b,c", "invalid selector: 'a=b,c'; can't understand 'c'"),
            (
                "a=b=c",
                "invalid field selector: unescaped character in value: '='",
            ),
            (
                r"a=x\y",
                r"invalid field selector: invalid escape sequence: \y",
            ),
            (
                r"a=x\",
                r"invalid field selector: invalid escape sequence: \",
            ),
            (
                "a!==b",
                "invalid field selector: unescaped character in value: '='",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                FieldSelector::parse(input),
                Err(SelectorError::Invalid(want.to_string())),
                "input {input:?}"
            );
        }
    }

    #[test]
    fn field_selector_operator_precedence_and_odd_terms() {
        // `!=` is found before `=` at the same position.
        let f = fsel("a!=b");
        assert_eq!(f.exact("a"), None);
        assert!(f.matches(&fields_of(&[("a", "c")])));
        assert!(!f.matches(&fields_of(&[("a", "b")])));
        // Trailing and doubled commas are ignored.
        assert_eq!(fsel("a=b,"), fsel("a=b"));
        assert_eq!(fsel("a=b,,c=d"), fsel("c=d,a=b"));
        // Field names are verbatim; the caller rejects unknown ones.
        assert_eq!(fsel("metadata.name =x").fields(), vec!["metadata.name "]);
        assert_eq!(fsel("=x").fields(), vec![""]);
    }

    #[test]
    fn field_selector_exact_and_fields() {
        let f = fsel("metadata.namespace=ns,metadata.name!=skip,metadata.name=keep");
        assert_eq!(f.exact("metadata.namespace"), Some("ns"));
        assert_eq!(f.exact("metadata.name"), Some("keep"));
        assert_eq!(f.exact("spec.nodeName"), None);
        assert_eq!(f.fields(), vec!["metadata.name", "metadata.namespace"]);
        assert_eq!(
            f.to_string(),
            "metadata.name!=skip,metadata.name=keep,metadata.namespace=ns"
        );
        // Conflicting pins: exact() is only a shortcut, matches() decides.
        let f = fsel("metadata.name=a,metadata.name=b");
        assert!(f.exact("metadata.name").is_some());
        assert!(!f.matches(&fields_of(&[("metadata.name", "a")])));
        assert!(!f.matches(&fields_of(&[("metadata.name", "b")])));
    }
}
