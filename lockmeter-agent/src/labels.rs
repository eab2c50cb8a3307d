//! Label rules: which lock files are exported, under what `lock.name`, and how many series.
//!
//! - `lock.name` is the path of the lock file, unless a `--name-map GLOB=NAME` rule matches it
//!   (first match wins): per-resource lock files (`/var/lock/job-*.lock`) fold into one name.
//! - `--include GLOB` (any of them must match, when given) and `--exclude GLOB` (none may
//!   match) select paths. A lock whose path could not be found is named `dev:inode`
//!   (`fe:00:1234`) and is exported only when no `--include` is given.
//! - At most `top` names get series of their own: gauges (held, waiters, hold age) go to the
//!   `top` busiest names of the moment, counters and histograms to the first `top` names seen;
//!   the rest are exported as `lock.name="(other)"`. The SDK's cardinality limit backs this up.

use std::collections::HashMap;
use std::path::Path;

use globset::{Glob, GlobMatcher, GlobSet, GlobSetBuilder};

use crate::AgentError;

/// The `lock.name` of series folded by the top-N bound.
pub const OTHER: &str = "(other)";

/// Name mapping and path selection.
#[derive(Clone, Debug, Default)]
pub struct LabelRules {
    name_map: Vec<(GlobMatcher, String)>,
    include: Option<GlobSet>,
    exclude: Option<GlobSet>,
}

fn glob(pattern: &str) -> Result<Glob, AgentError> {
    Glob::new(pattern).map_err(|e| AgentError::Config(format!("bad glob {pattern:?}: {e}")))
}

fn set(patterns: &[String]) -> Result<Option<GlobSet>, AgentError> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(glob(p)?);
    }
    b.build()
        .map(Some)
        .map_err(|e| AgentError::Config(format!("bad glob set: {e}")))
}

impl LabelRules {
    /// Builds the rules. `name_map` entries are `GLOB=NAME` strings.
    pub fn new(
        name_map: &[String],
        include: &[String],
        exclude: &[String],
    ) -> Result<LabelRules, AgentError> {
        let mut map = Vec::new();
        for rule in name_map {
            let (g, name) = rule.rsplit_once('=').ok_or_else(|| {
                AgentError::Config(format!("--name-map {rule:?}: expected GLOB=NAME"))
            })?;
            if g.is_empty() || name.is_empty() {
                return Err(AgentError::Config(format!(
                    "--name-map {rule:?}: expected GLOB=NAME"
                )));
            }
            map.push((glob(g)?.compile_matcher(), name.to_owned()));
        }
        Ok(LabelRules {
            name_map: map,
            include: set(include)?,
            exclude: set(exclude)?,
        })
    }

    /// Whether a lock on `path` (`None`: not found) is exported.
    pub fn admits(&self, path: Option<&Path>) -> bool {
        match path {
            Some(p) => {
                self.include.as_ref().is_none_or(|s| s.is_match(p))
                    && !self.exclude.as_ref().is_some_and(|s| s.is_match(p))
            }
            None => self.include.is_none(),
        }
    }

    /// The `lock.name` for a path: the first matching `--name-map` rule's name, or the path.
    pub fn name_for(&self, path: &Path) -> String {
        self.name_map
            .iter()
            .find(|(m, _)| m.is_match(path))
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| path.to_string_lossy().into_owned())
    }
}

/// Admits at most `limit` distinct names for cumulative series (counters, histograms): the
/// first ones seen. Later names are folded into [`OTHER`].
#[derive(Debug)]
pub struct NameBound {
    limit: usize,
    admitted: HashMap<String, ()>,
}

impl NameBound {
    /// A bound of `limit` names.
    pub fn new(limit: usize) -> NameBound {
        NameBound {
            limit,
            admitted: HashMap::new(),
        }
    }

    /// `name` if admitted (or room is left), else [`OTHER`].
    pub fn bound<'a>(&mut self, name: &'a str) -> &'a str {
        if self.admitted.contains_key(name) {
            return name;
        }
        if self.admitted.len() < self.limit {
            self.admitted.insert(name.to_owned(), ());
            return name;
        }
        OTHER
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn name_map_include_exclude() {
        let r = LabelRules::new(
            &["/var/lock/job-*.lock=jobs".into()],
            &["/var/lock/**".into()],
            &["**/skip*".into()],
        )
        .unwrap();
        assert_eq!(r.name_for(Path::new("/var/lock/job-17.lock")), "jobs");
        assert_eq!(
            r.name_for(Path::new("/var/lock/x.lock")),
            "/var/lock/x.lock"
        );
        assert!(r.admits(Some(Path::new("/var/lock/x.lock"))));
        assert!(!r.admits(Some(Path::new("/tmp/x.lock"))));
        assert!(!r.admits(Some(Path::new("/var/lock/skip.lock"))));
        assert!(!r.admits(None));
        assert!(LabelRules::new(&["nonsense".into()], &[], &[]).is_err());
        assert!(LabelRules::new(&["[=x".into()], &[], &[]).is_err());
    }

    #[test]
    fn bound_folds_late_names() {
        let mut b = NameBound::new(2);
        assert_eq!(b.bound("a"), "a");
        assert_eq!(b.bound("b"), "b");
        assert_eq!(b.bound("c"), OTHER);
        assert_eq!(b.bound("a"), "a");
    }
}
