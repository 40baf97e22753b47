//! Istio's AuthorizationPolicy path templates (Istio ≥ 1.20): a `paths` or
//! `notPaths` value holding `{*}` or `{**}` is an Envoy URI template, not a
//! `prefix*`/`*suffix` pattern. Validation ([`crate::validate`]) and the
//! gateway's authorization engine both parse templates here, so the rule a
//! repository is checked against is the rule the gateway enforces.
//!
//! Semantics, as Istio validates a template (`CheckValidPathTemplate`) and
//! Envoy matches it (`uri_template`, a regex over the path without its
//! query):
//! - `{*}` is exactly one path segment, of at least one character;
//! - `{**}` is zero or more characters, `/` included (so zero or more
//!   segments, and the separators around it stay literal: `/a/{**}`
//!   matches `/a/` and `/a/b/c`, not `/a`); it must be the last operator,
//!   though literal segments may follow it (`/{**}/edit`);
//! - every other segment is a literal, matched exactly (case-sensitively),
//!   made of RFC 3986 `pchar`s without `*`: `a-z A-Z 0-9 - . _ ~ % ! $ & '
//!   ( ) + , ; : @ =`; an operator never matches a character outside that
//!   set either;
//! - an operator is a whole segment: `a{*}b`, `{*}.txt`, `{id}` and any
//!   other `{` or `}` are errors (Istio: "contains '{' or '}' beyond a
//!   supported path template"), in a template or not.
//!
//! Envoy also refuses templates that Istio's validation lets through (and
//! then rejects the proxy's whole configuration): one that does not start
//! with `/`, or with an empty segment (`//`, a leading `//`). meshfed refuses
//! them when it validates, so a template it accepts always matches as
//! Envoy would.

use std::fmt;

/// `{*}`: one segment.
pub const MATCH_ONE: &str = "{*}";
/// `{**}`: zero or more segments; the last operator.
pub const MATCH_ANY: &str = "{**}";

/// One `/`-separated piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Matched exactly. Empty only as the last segment (a trailing `/`).
    Literal(Box<str>),
    /// `{*}`.
    One,
}

/// A parsed path template ([`parse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    /// The segments before `{**}` (every segment when there is none).
    head: Box<[Segment]>,
    /// With `{**}`: the literal segments after it, each with its leading
    /// `/` (`/{**}/a/b` → `/a/b`; empty when `{**}` is last).
    tail: Option<Box<str>>,
}

/// Why a path that uses braces is not a valid template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// `{` or `}` outside a whole `{*}`/`{**}` segment.
    Brace { segment: String },
    /// `{*}` or `{**}` after `{**}`.
    AfterAny,
    /// A template that does not start with `/`.
    NotAbsolute,
    /// An empty segment (`//`), other than a single trailing `/`.
    EmptySegment,
    /// A literal segment with a character outside `pchar` (or a `*`).
    BadLiteral { segment: String },
}

impl TemplateError {
    /// What to do about it.
    pub fn hint(&self) -> &'static str {
        match self {
            TemplateError::Brace { .. } => {
                "`{*}` (one segment) and `{**}` (any number of segments) must each be a whole \
                 segment, as in `/users/{*}/profile`; other braces (`{id}`, `{*}.txt`) are not \
                 templates Istio supports"
            }
            TemplateError::AfterAny => {
                "put `{**}` last among the operators (`/api/{*}/{**}`); literal segments may \
                 follow it (`/{**}/edit`)"
            }
            TemplateError::NotAbsolute => "start the template with `/` (`/{*}/edit`)",
            TemplateError::EmptySegment => {
                "remove the empty segment (`//`); a template matches segment by segment"
            }
            TemplateError::BadLiteral { .. } => {
                "a template's other segments are literal: letters, digits and `-._~%!$&'()+,;:@=`; \
                 `*` patterns (`/a/*`) cannot be mixed with `{*}`/`{**}`"
            }
        }
    }

    /// The reason alone, without the segment (for messages that must be
    /// `'static`).
    pub fn reason(&self) -> &'static str {
        match self {
            TemplateError::Brace { .. } => {
                "`{` or `}` outside a whole `{*}` or `{**}` segment (Istio refuses it)"
            }
            TemplateError::AfterAny => "`{**}` must be the last operator (Istio refuses it)",
            TemplateError::NotAbsolute => "a path template must start with `/` (Envoy refuses it)",
            TemplateError::EmptySegment => {
                "a path template must not have an empty segment (Envoy refuses it)"
            }
            TemplateError::BadLiteral { .. } => {
                "a path template's literal segment has a character Envoy does not allow \
                 (Istio refuses it)"
            }
        }
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Brace { segment } => write!(
                f,
                "segment `{segment}` has `{{` or `}}` outside a whole `{{*}}` or `{{**}}` segment \
                 (Istio refuses it)"
            ),
            TemplateError::BadLiteral { segment } => write!(
                f,
                "segment `{segment}` of a path template has a character Envoy does not allow in a \
                 literal (Istio refuses it)"
            ),
            other => f.write_str(other.reason()),
        }
    }
}

impl std::error::Error for TemplateError {}

/// Whether a byte is one a template's literal may hold and an operator may
/// match: RFC 3986 `pchar` without `*` (Envoy's and Istio's set).
fn pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'+'
                | b','
                | b';'
                | b':'
                | b'@'
                | b'='
        )
}

/// Whether a path value uses Istio's template operators.
pub fn is_template(path: &str) -> bool {
    path.contains(MATCH_ONE) || path.contains(MATCH_ANY)
}

/// Reads a `paths`/`notPaths` value: `Ok(None)` when it has no brace at all
/// (an ordinary exact, `prefix*`, `*suffix` or `*` pattern), the template
/// when it is a valid one, else why not.
pub fn parse(path: &str) -> Result<Option<PathTemplate>, TemplateError> {
    if !path.contains(['{', '}']) {
        return Ok(None);
    }
    if !is_template(path) {
        // Braces that are no operator at all: Istio refuses them too.
        let segment = path
            .split('/')
            .find(|s| s.contains(['{', '}']))
            .unwrap_or(path);
        return Err(TemplateError::Brace {
            segment: segment.to_string(),
        });
    }
    let Some(rest) = path.strip_prefix('/') else {
        // Istio's own check looks at segments first; report a brace problem
        // before the missing `/` when there is one.
        check_segments(path.trim_start_matches('/'))?;
        return Err(TemplateError::NotAbsolute);
    };
    check_segments(rest)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let last = parts.len() - 1;
    let mut head = Vec::new();
    let mut tail: Option<String> = None;
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() && !(i == last && i > 0) {
            return Err(TemplateError::EmptySegment);
        }
        match (*part, &mut tail) {
            (MATCH_ANY, None) => tail = Some(String::new()),
            (MATCH_ONE, None) => head.push(Segment::One),
            (MATCH_ONE | MATCH_ANY, Some(_)) => return Err(TemplateError::AfterAny),
            (lit, None) => head.push(Segment::Literal(lit.into())),
            (lit, Some(t)) => {
                t.push('/');
                t.push_str(lit);
            }
        }
    }
    Ok(Some(PathTemplate {
        head: head.into(),
        tail: tail.map(Into::into),
    }))
}

/// Istio's segment rules (`CheckValidPathTemplate`): each segment of the
/// path, its leading and trailing `/` trimmed, is `{*}`, `{**}` (and no
/// operator after `{**}`), or a literal of `pchar`s without braces.
fn check_segments(path: &str) -> Result<(), TemplateError> {
    let mut any = false;
    for seg in path.trim_end_matches('/').split('/') {
        match seg {
            MATCH_ONE | MATCH_ANY if any => return Err(TemplateError::AfterAny),
            MATCH_ANY => any = true,
            MATCH_ONE => {}
            s if s.contains(['{', '}']) => {
                return Err(TemplateError::Brace {
                    segment: s.to_string(),
                });
            }
            // An empty segment is reported by the caller (Envoy's rule),
            // which knows whether it is a trailing `/`.
            "" => {}
            s if !s.bytes().all(pchar) => {
                return Err(TemplateError::BadLiteral {
                    segment: s.to_string(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

impl PathTemplate {
    /// Whether a request path (normalized, without its query) matches, as
    /// Envoy's URI template regex would: the whole path, byte for byte.
    pub fn matches(&self, path: &str) -> bool {
        let Some(mut rest) = path.strip_prefix('/') else {
            return false;
        };
        let n = self.head.len();
        for (i, seg) in self.head.iter().enumerate() {
            let (piece, after) = match rest.split_once('/') {
                Some((p, a)) => (p, Some(a)),
                None => (rest, None),
            };
            let ok = match seg {
                Segment::Literal(l) => piece == &**l,
                Segment::One => !piece.is_empty() && piece.bytes().all(pchar),
            };
            if !ok {
                return false;
            }
            let last = i + 1 == n && self.tail.is_none();
            match (after, last) {
                // The last segment must end the path.
                (None, true) => return true,
                (Some(_), true) | (None, false) => return false,
                (Some(a), false) => rest = a,
            }
        }
        // `{**}`: any pchar or `/`, then the literal tail.
        let Some(tail) = self.tail.as_deref() else {
            // No segment at all cannot happen (a template has an operator).
            return false;
        };
        rest.strip_suffix(tail)
            .is_some_and(|any| any.bytes().all(|b| b == b'/' || pchar(b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> PathTemplate {
        parse(s).unwrap().unwrap()
    }

    #[test]
    fn one_matches_exactly_one_non_empty_segment() {
        let p = t("/path/template/{*}");
        assert!(p.matches("/path/template/x"));
        assert!(p.matches("/path/template/a.b~c%2F"));
        assert!(!p.matches("/path/template/"), "one segment is not empty");
        assert!(!p.matches("/path/template"));
        assert!(!p.matches("/path/template/x/y"), "one segment, not two");
        assert!(!p.matches("/path/template/x/"));
        assert!(
            !p.matches("/Path/template/x"),
            "literals are case-sensitive"
        );
        assert!(!p.matches("/path/template/a b"), "outside pchar");
        assert!(!p.matches("/path/template/a*"), "`*` is no pchar");
        let mid = t("/users/{*}/profile");
        assert!(mid.matches("/users/ann/profile"));
        assert!(!mid.matches("/users//profile"));
        assert!(!mid.matches("/users/a/b/profile"));
        assert!(!mid.matches("/users/ann/profile/x"));
        let trailing = t("/{*}/foo/");
        assert!(trailing.matches("/a/foo/"));
        assert!(!trailing.matches("/a/foo"));
    }

    #[test]
    fn any_matches_zero_or_more_segments_between_literal_separators() {
        let last = t("/static/{**}");
        assert!(last.matches("/static/"));
        assert!(last.matches("/static/a"));
        assert!(last.matches("/static/a/b/c.css"));
        assert!(
            !last.matches("/static"),
            "the `/` before `{{**}}` is literal"
        );
        assert!(!last.matches("/staticx/a"));
        let first = t("/{**}/path/template");
        assert!(first.matches("/x/path/template"));
        assert!(first.matches("/a/b/c/path/template"));
        assert!(first.matches("//path/template"));
        assert!(
            !first.matches("/path/template"),
            "Envoy needs the `/` on both sides"
        );
        assert!(!first.matches("/a/bpath/template"));
        assert!(!first.matches("/x/path/template/"));
        assert!(!first.matches("/x y/path/template"), "outside pchar");
        let both = t("/api/{*}/{**}");
        assert!(both.matches("/api/v1/"));
        assert!(both.matches("/api/v1/a/b"));
        assert!(!both.matches("/api/v1"));
        let mid = t("/foo/{**}/bar");
        assert!(mid.matches("/foo/x/y/bar"));
        assert!(mid.matches("/foo//bar"));
        assert!(!mid.matches("/foo/bar"));
    }

    #[test]
    fn a_value_without_braces_is_no_template() {
        for p in ["/exact", "/prefix/*", "*/suffix", "*", "/a/**"] {
            assert_eq!(parse(p), Ok(None), "{p}");
        }
    }

    #[test]
    fn malformed_templates_are_refused_as_istio_and_envoy_refuse_them() {
        // Istio's own cases (pkg/config/security TestCheckValidPathTemplate).
        for ok in [
            "/{*}/foo",
            "/{*}/foo/",
            "/foo/{**}/bar",
            "/foo/bar/{**}",
            "/{**}",
            "/a=b/{*}",
        ] {
            assert!(parse(ok).is_ok_and(|t| t.is_some()), "{ok}");
        }
        let bad = |p: &str| parse(p).unwrap_err();
        assert!(matches!(
            bad("/foo/{**}buzz/bar"),
            TemplateError::Brace { .. }
        ));
        assert!(matches!(
            bad("/{*}/foo/{}/bar"),
            TemplateError::Brace { .. }
        ));
        assert!(matches!(
            bad("/foo/{*}/bar/*"),
            TemplateError::BadLiteral { .. }
        ));
        assert!(matches!(
            bad("/foo/{*}/bar/**/buzz"),
            TemplateError::BadLiteral { .. }
        ));
        assert!(matches!(
            bad("/foo/{buzz}/bar"),
            TemplateError::Brace { .. }
        ));
        assert!(matches!(bad("/{buzz}"), TemplateError::Brace { .. }));
        assert!(matches!(
            bad("/foo/{buzz=*}/bar/{**}"),
            TemplateError::Brace { .. }
        ));
        assert!(matches!(
            bad("/{*}/foo/{**}bar"),
            TemplateError::Brace { .. }
        ));
        assert!(matches!(
            bad("/{*}/foo/{*}.txt"),
            TemplateError::Brace { .. }
        ));
        assert!(matches!(bad("/a{*}b"), TemplateError::Brace { .. }));
        assert!(matches!(bad("/{*}/foo/{temp"), TemplateError::Brace { .. }));
        assert!(matches!(
            bad("/{*}/foo/temp}/bar"),
            TemplateError::Brace { .. }
        ));
        assert_eq!(bad("/{**}/foo/temp/{*}/bar"), TemplateError::AfterAny);
        assert_eq!(bad("/{**}/{**}"), TemplateError::AfterAny);
        assert_eq!(bad("/{**}/foo/temp/{**}/bar"), TemplateError::AfterAny);
        assert!(matches!(
            bad("/{*}/foo/?abc"),
            TemplateError::BadLiteral { .. }
        ));
        // Accepted by Istio's check, refused by Envoy's parser.
        assert_eq!(bad("{*}/foo"), TemplateError::NotAbsolute);
        assert_eq!(bad("//{*}"), TemplateError::EmptySegment);
        assert_eq!(bad("/a//{*}"), TemplateError::EmptySegment);
        assert_eq!(bad("/{*}//"), TemplateError::EmptySegment);
        for e in [bad("/a{*}b"), bad("/{**}/{*}"), bad("{*}")] {
            assert!(!e.hint().is_empty() && !e.to_string().is_empty());
        }
    }

    /// Envoy's matcher, built as Envoy builds it (`uri_template_internal`:
    /// `{*}` → `[pchar]+`, `{**}` → `[pchar/]*`, literals escaped, the
    /// whole path matched).
    fn envoy_regex(template: &str) -> regex::Regex {
        const L: &str = r"a-zA-Z0-9\-._~%!$&'()+,;:@=";
        let body: Vec<String> = template
            .split('/')
            .map(|seg| match seg {
                MATCH_ONE => format!("[{L}]+"),
                MATCH_ANY => format!("[{L}/]*"),
                lit => regex::escape(lit),
            })
            .collect();
        regex::Regex::new(&format!("^{}$", body.join("/"))).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 2048,
            ..Default::default()
        })]

        /// Every valid template matches exactly the paths Envoy's regex
        /// matches: never more (an ALLOW widened), never less (a DENY
        /// dropped).
        #[test]
        fn a_template_matches_exactly_what_envoys_regex_matches(
            segments in proptest::collection::vec(
                proptest::sample::select(vec!["{*}", "{**}", "a", "b", "a.b", "%2F", "=", ""]),
                1..5,
            ),
            fills in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::sample::select(vec!["a", "b", "/", "a.b", "%2F", "*", " ", "=", "?"]),
                    0..4,
                ),
                0..5,
            ),
        ) {
            let template = format!("/{}", segments.join("/"));
            let Ok(Some(t)) = parse(&template) else {
                return Ok(());
            };
            let re = envoy_regex(&template);
            // Paths shaped like the template (operators filled with random
            // text, `/` included), so that both matches and near misses
            // come up.
            let mut fill = fills.iter().map(|f| f.concat());
            let path: String = template
                .split('/')
                .map(|seg| match seg {
                    MATCH_ONE | MATCH_ANY => fill.next().unwrap_or_default(),
                    lit => lit.to_string(),
                })
                .collect::<Vec<_>>()
                .join("/");
            proptest::prop_assert_eq!(t.matches(&path), re.is_match(&path), "{} vs {}", template, path);
            let random = format!("/{}", fills.concat().concat());
            proptest::prop_assert_eq!(t.matches(&random), re.is_match(&random), "{} vs {}", template, random);
        }
    }
}
