//! Allowlists of models and upstream resources, as fully anchored patterns.
//!
//! Every pattern must match the **whole** value. Why: an allowlist is a
//! security boundary, and a substring match silently widens it (`gpt-4`
//! would admit `gpt-4o`, `api.openai.com` would admit
//! `api.openai.com.evil.example`). Regexes are wrapped so that they cannot
//! escape the anchors, and globs are translated into anchored regexes.

use std::fmt;
use std::str::FromStr;

use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Longest accepted pattern text, in characters.
pub const MAX_PATTERN_LEN: usize = 512;

/// Upper bound on a compiled pattern's size. Why: patterns are admin input,
/// and a short regex such as `(a{100}){100}` can compile into a huge program;
/// bounding it keeps one bad pattern from eating a service's memory.
const COMPILED_SIZE_LIMIT: usize = 1 << 20;

/// Why a pattern or a pattern attribute was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AllowlistError {
    /// The pattern text is empty.
    #[error("pattern is empty")]
    Empty,
    /// The pattern text is longer than [`MAX_PATTERN_LEN`].
    #[error("pattern is {len} characters long; at most {max} are allowed")]
    TooLong {
        /// Length of the given pattern, in characters.
        len: usize,
        /// [`MAX_PATTERN_LEN`].
        max: usize,
    },
    /// The regex does not compile (or compiles too large).
    #[error("invalid regex {pattern:?}: {reason}")]
    InvalidRegex {
        /// The given pattern text.
        pattern: String,
        /// The regex engine's explanation.
        reason: String,
    },
    /// Not `glob` or `regex`.
    #[error("unknown pattern kind {0:?}: expected glob or regex")]
    UnknownKind(String),
    /// Not `resource` or `model`.
    #[error("unknown allowlist target {0:?}: expected resource or model")]
    UnknownTarget(String),
}

/// How a pattern's text is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatternKind {
    /// `*` = any run of characters except `/`, `**` = any run including `/`,
    /// `?` = one character except `/`; everything else is literal.
    Glob,
    /// A regular expression (Rust `regex` syntax), matched against the
    /// whole value.
    Regex,
}

impl PatternKind {
    /// `"glob"` or `"regex"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            PatternKind::Glob => "glob",
            PatternKind::Regex => "regex",
        }
    }
}

impl fmt::Display for PatternKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PatternKind {
    type Err = AllowlistError;

    /// `glob` or `regex`, ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        [PatternKind::Glob, PatternKind::Regex]
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| AllowlistError::UnknownKind(name.chars().take(40).collect()))
    }
}

/// What an allowlist restricts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllowTarget {
    /// The upstream host and path, e.g. `api.openai.com/v1/chat/completions`
    /// (no scheme, no query string).
    Resource,
    /// The model name requested, e.g. `gpt-4o-mini`.
    Model,
}

impl AllowTarget {
    /// `"resource"` or `"model"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            AllowTarget::Resource => "resource",
            AllowTarget::Model => "model",
        }
    }
}

impl fmt::Display for AllowTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AllowTarget {
    type Err = AllowlistError;

    /// `resource` or `model`, ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        [AllowTarget::Resource, AllowTarget::Model]
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| AllowlistError::UnknownTarget(name.chars().take(40).collect()))
    }
}

/// A compiled, fully anchored pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    kind: PatternKind,
    text: String,
    regex: Regex,
}

impl Pattern {
    /// Compiles `text` as a `kind` pattern that must match whole values.
    ///
    /// Matching is case-sensitive (model names and URL paths are); callers
    /// should lowercase host names before matching resources.
    pub fn compile(kind: PatternKind, text: &str) -> Result<Pattern, AllowlistError> {
        if text.is_empty() {
            return Err(AllowlistError::Empty);
        }
        let len = text.chars().count();
        if len > MAX_PATTERN_LEN {
            return Err(AllowlistError::TooLong {
                len,
                max: MAX_PATTERN_LEN,
            });
        }
        let body = match kind {
            PatternKind::Glob => glob_to_regex(text),
            PatternKind::Regex => {
                // Compile the text on its own first. Why: wrapping alone is
                // not enough to anchor it. `a)|(b` is invalid by itself, but
                // `^(?:a)|(b)$` is valid and matches anything starting with
                // `a`. A text that compiles alone has balanced groups, so the
                // wrapper's own parentheses cannot be re-paired.
                build(text, text)?;
                text.to_owned()
            }
        };
        let regex = build(&format!("^(?:{body})$"), text)?;
        Ok(Pattern {
            kind,
            text: text.to_owned(),
            regex,
        })
    }

    /// Whether `value` matches the pattern in full.
    pub fn matches(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }

    /// How the pattern text is interpreted.
    pub fn kind(&self) -> PatternKind {
        self.kind
    }

    /// The pattern text as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.text == other.text
    }
}

impl Eq for Pattern {}

impl fmt::Display for Pattern {
    /// `"glob:gpt-4o*"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.text)
    }
}

fn build(source: &str, given: &str) -> Result<Regex, AllowlistError> {
    RegexBuilder::new(source)
        .size_limit(COMPILED_SIZE_LIMIT)
        .dfa_size_limit(COMPILED_SIZE_LIMIT)
        .build()
        .map_err(|e| AllowlistError::InvalidRegex {
            pattern: given.chars().take(MAX_PATTERN_LEN).collect(),
            reason: e.to_string(),
        })
}

/// Translates a glob into an (unanchored) regex body.
fn glob_to_regex(glob: &str) -> String {
    let mut out = String::with_capacity(glob.len() * 2);
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' if chars.peek() == Some(&'*') => {
                chars.next();
                // (?s): "any run" means any characters, newlines included,
                // exactly like `*` (which only excludes '/').
                out.push_str("(?s:.*)");
            }
            '*' => out.push_str("[^/]*"),
            '?' => out.push_str("[^/]"),
            other => {
                let mut buf = [0u8; 4];
                out.push_str(&regex::escape(other.encode_utf8(&mut buf)));
            }
        }
    }
    out
}

/// Whether `value` is allowed by `patterns`: true if any pattern matches it.
///
/// An empty list means "no restriction" and allows everything. Why: an
/// allowlist is opt-in per agent; an agent with no entries is governed by
/// its budgets alone. (To block everything, disable the agent instead.)
pub fn is_allowed(patterns: &[Pattern], value: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> Pattern {
        Pattern::compile(PatternKind::Glob, text).unwrap()
    }

    fn regex(text: &str) -> Pattern {
        Pattern::compile(PatternKind::Regex, text).unwrap()
    }

    #[test]
    fn glob_table() {
        let cases = [
            ("gpt-4o*", "gpt-4o-mini", true),
            ("gpt-4o*", "gpt-4o", true),
            ("gpt-4o*", "xgpt-4o", false),
            ("gpt-4o", "gpt-4o-mini", false),
            ("gpt-?o", "gpt-4o", true),
            ("gpt-?o", "gpt-40o", false),
            (
                "api.openai.com/v1/**",
                "api.openai.com/v1/chat/completions",
                true,
            ),
            ("api.openai.com/v1/**", "api.openai.com/v2/chat", false),
            ("api.openai.com/*", "api.openai.com/v1/chat", false),
            ("api.openai.com/*", "api.openai.com/v1", true),
            // '.' is literal in a glob.
            ("api.openai.com/*", "apixopenai.com/v1", false),
            ("api.openai.com/**", "api.openai.com.evil.example/v1", false),
            ("*/v1/models", "api.openai.com/v1/models", true),
            ("*/v1/models", "a/b/v1/models", false),
            ("**/models", "a/b/v1/models", true),
            ("a?c", "a/c", false),
            ("claude-[3]", "claude-[3]", true),
            ("claude-[3]", "claude-3", false),
            ("model(1)+", "model(1)+", true),
            ("gpt-4o*", "GPT-4o", false),
            // `$` is end-of-text in Rust (not "before a final newline").
            ("gpt-4o", "gpt-4o\n", false),
            ("**", "a/b\nc", true),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                glob(pattern).matches(value),
                expected,
                "glob {pattern:?} vs {value:?}"
            );
        }
    }

    #[test]
    fn regex_table() {
        let cases = [
            ("gpt-4", "gpt-4", true),
            ("gpt-4", "gpt-4o", false),
            ("gpt-4", "xgpt-4", false),
            ("gpt-4", "gpt-4\n", false),
            ("gpt-4|gpt-4o", "gpt-4o", true),
            ("gpt-4|gpt-4o", "gpt-4o-mini", false),
            ("gpt-4o(-mini)?", "gpt-4o-mini", true),
            ("claude-3-.*", "claude-3-opus", true),
            ("claude-3-.*", "claude-2", false),
            // Flags set inside the pattern cannot loosen the outer anchors.
            ("(?m)gpt", "x\ngpt", false),
            ("(?s).*gpt", "x\ngpt", true),
            ("(?i)gpt-4", "GPT-4", true),
            ("(?i)gpt-4", "GPT-4o", false),
        ];
        for (pattern, value, expected) in cases {
            assert_eq!(
                regex(pattern).matches(value),
                expected,
                "regex {pattern:?} vs {value:?}"
            );
        }
    }

    #[test]
    fn regex_cannot_escape_the_anchors() {
        // Valid once wrapped as ^(?:a)|(b)$, which would match "a…" — refused.
        for text in ["a)|(b", ")|(", "a)(?:", "(?x)a#"] {
            assert!(
                matches!(
                    Pattern::compile(PatternKind::Regex, text),
                    Err(AllowlistError::InvalidRegex { .. })
                ),
                "{text:?} must be refused"
            );
        }
    }

    #[test]
    fn invalid_patterns() {
        assert_eq!(
            Pattern::compile(PatternKind::Glob, ""),
            Err(AllowlistError::Empty)
        );
        assert_eq!(
            Pattern::compile(PatternKind::Regex, ""),
            Err(AllowlistError::Empty)
        );
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        assert_eq!(
            Pattern::compile(PatternKind::Glob, &long),
            Err(AllowlistError::TooLong {
                len: MAX_PATTERN_LEN + 1,
                max: MAX_PATTERN_LEN
            })
        );
        assert!(Pattern::compile(PatternKind::Glob, &"a".repeat(MAX_PATTERN_LEN)).is_ok());
        let err = Pattern::compile(PatternKind::Regex, "gpt-(4").unwrap_err();
        assert!(matches!(err, AllowlistError::InvalidRegex { .. }));
        assert!(
            err.to_string().starts_with("invalid regex \"gpt-(4\": "),
            "{err}"
        );
        // Short but enormous once compiled.
        assert!(matches!(
            Pattern::compile(PatternKind::Regex, "((a{100}){100}){100}"),
            Err(AllowlistError::InvalidRegex { .. })
        ));
    }

    #[test]
    fn is_allowed_rules() {
        assert!(is_allowed(&[], "anything"));
        let list = [glob("gpt-4o*"), regex("claude-3-(opus|sonnet)")];
        assert!(is_allowed(&list, "gpt-4o-mini"));
        assert!(is_allowed(&list, "claude-3-opus"));
        assert!(!is_allowed(&list, "claude-3-haiku"));
        assert!(!is_allowed(&list, ""));
    }

    #[test]
    fn names_and_accessors() {
        assert_eq!("glob".parse::<PatternKind>(), Ok(PatternKind::Glob));
        assert_eq!("Regex".parse::<PatternKind>(), Ok(PatternKind::Regex));
        assert_eq!(
            "wildcard".parse::<PatternKind>(),
            Err(AllowlistError::UnknownKind("wildcard".into()))
        );
        assert_eq!("resource".parse::<AllowTarget>(), Ok(AllowTarget::Resource));
        assert_eq!("model".parse::<AllowTarget>(), Ok(AllowTarget::Model));
        assert_eq!(
            "host".parse::<AllowTarget>(),
            Err(AllowlistError::UnknownTarget("host".into()))
        );
        let p = glob("gpt-*");
        assert_eq!(p.kind(), PatternKind::Glob);
        assert_eq!(p.as_str(), "gpt-*");
        assert_eq!(p.to_string(), "glob:gpt-*");
        assert_eq!(p, glob("gpt-*"));
        assert_ne!(p, regex("gpt-*"));
    }
}
