//! Topic rewriting on the way through a bridge: the first `map` rule whose
//! filter matches gives the topic (`{1}`, `{2}`.. are the levels matched by
//! `+`, `{#}` what `#` matched); then a prefix is stripped, then another
//! added. Every rule is checked when it is added, so a rewrite that exists
//! always yields a topic.

use steadfast_core::{validate_topic_filter, FilterError};

/// How a bridge route rewrites topics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    map: Vec<(Vec<String>, String)>,
    strip: Option<String>,
    prefix: Option<String>,
}

/// Why a rewrite rule is refused; each says the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RewriteError {
    /// The `from` side is not a topic filter.
    #[error("map from `{from}`: {cause}")]
    Filter {
        /// The filter as given.
        from: String,
        /// Why it is not one.
        cause: FilterError,
    },
    /// The `to` side cannot become a topic from what `from` matches.
    #[error("map from `{from}` to `{to}`: {problem}")]
    Template {
        /// The filter.
        from: String,
        /// The template.
        to: String,
        /// What is wrong with it.
        problem: TemplateProblem,
    },
    /// A prefix with a wildcard or NUL in it.
    #[error("{which} `{prefix}` may not hold wildcards")]
    Prefix {
        /// `topic_prefix` or `strip_prefix`.
        which: &'static str,
        /// The prefix as given.
        prefix: String,
    },
}

/// What is wrong with a `to` template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateProblem {
    /// Nothing at all.
    #[error("the new topic is empty")]
    Empty,
    /// Literal text with `+`, `#`, braces or NUL.
    #[error("`{0}` may not hold wildcards or braces")]
    Wildcard(String),
    /// A `{` without its `}`.
    #[error("a `{{` is not closed")]
    Unclosed,
    /// Braces around something else than a number or `#`.
    #[error("`{{{0}}}` is not a placeholder; use {{1}}.. or {{#}}")]
    NotAPlaceholder(String),
    /// `{n}` beyond the filter's `+` levels.
    #[error("{{{n}}} has no `+` to fill it (the pattern has {pluses})")]
    NoPlus {
        /// The placeholder's number.
        n: usize,
        /// How many `+` the filter has.
        pluses: usize,
    },
    /// `{#}` with a filter that does not end in `#`.
    #[error("{{#}} needs a pattern that ends in `#`")]
    NoHash,
}

impl Rewrite {
    /// No rewriting: topics go through as they came.
    pub fn new() -> Rewrite {
        Rewrite::default()
    }

    /// Adds a rule, tried after those added before: a topic matching the
    /// filter `from` becomes `to`, with `{1}`.. and `{#}` filled in.
    pub fn map(mut self, from: &str, to: &str) -> Result<Rewrite, RewriteError> {
        validate_topic_filter(from).map_err(|cause| RewriteError::Filter { from: from.to_owned(), cause })?;
        let pattern: Vec<String> = from.split('/').map(str::to_owned).collect();
        check_template(&pattern, to).map_err(|problem| RewriteError::Template {
            from: from.to_owned(),
            to: to.to_owned(),
            problem,
        })?;
        self.map.push((pattern, to.to_owned()));
        Ok(self)
    }

    /// Removes this prefix (after the map), where a topic has it.
    pub fn strip_prefix(mut self, prefix: &str) -> Result<Rewrite, RewriteError> {
        self.strip = checked_prefix("strip_prefix", prefix)?;
        Ok(self)
    }

    /// Adds this prefix to every topic, last.
    pub fn prefix(mut self, prefix: &str) -> Result<Rewrite, RewriteError> {
        self.prefix = checked_prefix("topic_prefix", prefix)?;
        Ok(self)
    }

    /// The topic `t` is sent under upstream.
    pub fn apply(&self, t: &str) -> String {
        let mut topic = t.to_owned();
        for (pattern, to) in &self.map {
            if let Some((caps, rest)) = capture(pattern, t) {
                topic = substitute(to, &caps, rest.as_deref());
                break;
            }
        }
        if let Some(s) = &self.strip {
            if let Some(rest) = topic.strip_prefix(s.as_str()) {
                topic = rest.to_owned();
            }
        }
        if let Some(p) = &self.prefix {
            let mut prefixed = String::with_capacity(p.len() + topic.len());
            prefixed.push_str(p);
            prefixed.push_str(&topic);
            return prefixed;
        }
        topic
    }
}

fn checked_prefix(which: &'static str, prefix: &str) -> Result<Option<String>, RewriteError> {
    if prefix.contains(['+', '#', '\0']) {
        return Err(RewriteError::Prefix { which, prefix: prefix.to_owned() });
    }
    Ok((!prefix.is_empty()).then(|| prefix.to_owned()))
}

/// The levels a filter's `+` matched, in order, and what its `#` matched.
fn capture(pattern: &[String], topic: &str) -> Option<(Vec<String>, Option<String>)> {
    let levels: Vec<&str> = topic.split('/').collect();
    let mut caps = Vec::new();
    for (i, p) in pattern.iter().enumerate() {
        match p.as_str() {
            "#" => return Some((caps, Some(levels.get(i..).map(|l| l.join("/")).unwrap_or_default()))),
            "+" => caps.push((*levels.get(i)?).to_owned()),
            lit => {
                if levels.get(i) != Some(&lit) {
                    return None;
                }
            }
        }
    }
    (levels.len() == pattern.len()).then_some((caps, None))
}

/// The pieces of a `to` template: literal text, `{n}` (the n-th `+`,
/// from 1) and `{#}` (what `#` matched).
enum Piece<'a> {
    Text(&'a str),
    Plus(usize),
    Rest,
}

fn pieces(to: &str) -> Result<Vec<Piece<'_>>, TemplateProblem> {
    let mut out = Vec::new();
    let mut rest = to;
    while let Some(open) = rest.find('{') {
        out.push(Piece::Text(&rest[..open]));
        let close = rest[open..].find('}').ok_or(TemplateProblem::Unclosed)? + open;
        match &rest[open + 1..close] {
            "#" => out.push(Piece::Rest),
            n => out.push(Piece::Plus(n.parse().map_err(|_| TemplateProblem::NotAPlaceholder(n.to_owned()))?)),
        }
        rest = &rest[close + 1..];
    }
    out.push(Piece::Text(rest));
    Ok(out)
}

/// Checks a `to` template against its pattern: a topic name once filled
/// in, its placeholders matched by wildcards of the pattern.
fn check_template(pattern: &[String], to: &str) -> Result<(), TemplateProblem> {
    let pluses = pattern.iter().filter(|p| *p == "+").count();
    let hash = pattern.last().is_some_and(|p| p == "#");
    if to.is_empty() {
        return Err(TemplateProblem::Empty);
    }
    for p in pieces(to)? {
        match p {
            Piece::Text(t) if t.contains(['+', '#', '{', '}', '\0']) => {
                return Err(TemplateProblem::Wildcard(t.to_owned()))
            }
            Piece::Plus(n) if n == 0 || n > pluses => return Err(TemplateProblem::NoPlus { n, pluses }),
            Piece::Rest if !hash => return Err(TemplateProblem::NoHash),
            _ => {}
        }
    }
    Ok(())
}

/// Fills a checked template in one pass (a captured level that looks like
/// a placeholder stays as it is).
fn substitute(to: &str, caps: &[String], rest: Option<&str>) -> String {
    let mut out = String::new();
    for p in pieces(to).unwrap_or_default() {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Plus(n) => out.push_str(caps.get(n - 1).map_or("", String::as_str)),
            Piece::Rest => out.push_str(rest.unwrap_or("")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(map: &[(&str, &str)], strip: &str, prefix: &str) -> Rewrite {
        let mut r = Rewrite::new();
        for (from, to) in map {
            r = r.map(from, to).unwrap();
        }
        r.strip_prefix(strip).unwrap().prefix(prefix).unwrap()
    }

    #[test]
    fn topics_are_rewritten_by_map_then_strip_then_prefix() {
        let r = rw(&[("sensors/+/temp", "t/{1}"), ("alarm/#", "a/{#}")], "sensors/", "site-7/");
        assert_eq!(r.apply("sensors/k1/temp"), "site-7/t/k1");
        assert_eq!(r.apply("alarm/door/front"), "site-7/a/door/front");
        assert_eq!(r.apply("sensors/k1/hum"), "site-7/k1/hum");
        assert_eq!(r.apply("other"), "site-7/other");
        assert_eq!(rw(&[], "", "").apply("x/y"), "x/y");
        assert_eq!(rw(&[("a/+/+", "{2}/{1}")], "", "").apply("a/b/c"), "c/b");
        assert_eq!(rw(&[("a/+", "x")], "", "").apply("a/b/c"), "a/b/c", "no match: longer topic");
        assert_eq!(rw(&[("a/+/#", "{1}-{#}")], "", "").apply("a/{2}/x/y"), "{2}-x/y", "one pass");
    }

    #[test]
    fn templates_are_checked_against_their_pattern() {
        let problem = |from: &str, to: &str| match Rewrite::new().map(from, to) {
            Err(RewriteError::Template { problem, .. }) => Some(problem),
            _ => None,
        };
        assert!(Rewrite::new().map("a/+/#", "x/{1}/{#}").is_ok());
        assert_eq!(problem("a/+", "x/{2}"), Some(TemplateProblem::NoPlus { n: 2, pluses: 1 }));
        assert_eq!(problem("a/+", "x/{#}"), Some(TemplateProblem::NoHash));
        assert_eq!(problem("a/#", "y/#"), Some(TemplateProblem::Wildcard("y/#".into())));
        assert_eq!(problem("a/#", "y/{x}"), Some(TemplateProblem::NotAPlaceholder("x".into())));
        assert_eq!(problem("a/#", ""), Some(TemplateProblem::Empty));
        assert!(problem("a/#", "y/{1").is_some());
        assert!(matches!(Rewrite::new().map("a/#/b", "x"), Err(RewriteError::Filter { .. })));
        assert!(matches!(Rewrite::new().prefix("a/+/"), Err(RewriteError::Prefix { .. })));
        let shown = Rewrite::new().map("a/+", "x/{2}").unwrap_err().to_string();
        assert!(shown.contains("no `+`"), "{shown}");
    }
}
