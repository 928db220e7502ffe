//! Which inputs this task owns and where each one's output goes, decided from the listings
//! alone so that every task of a job, and every retry of a task, decides the same way.

use std::collections::HashSet;

use crate::pipeline::ImageFormat;
use crate::storage::Listed;

use super::manifest::{MANIFEST_DIR, Record, Status, Task};

/// One input this task must turn into an output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Work {
    /// Position among this task's inputs (the manifest keeps this order).
    pub position: usize,
    /// Name under the input.
    pub input: String,
    /// Name under the output.
    pub output: String,
    /// The input's size in bytes, from the listing.
    pub size: u64,
}

/// A task's share of the input: what to compute, and what was settled without computing.
#[derive(Debug, Default)]
pub struct Plan {
    /// Inputs to run through the model.
    pub work: Vec<Work>,
    /// Inputs settled from the listings (output present already, or refused by name).
    pub settled: Vec<Record>,
    /// Images in the whole input, across every task, with the entries that could not be read
    /// (each recorded as failed by one task).
    pub images: usize,
    /// Listed files that are not images (by extension), across every task.
    pub ignored: usize,
}

impl Plan {
    /// Plans task `task`'s share of `inputs` (the input's listing, in name order).
    ///
    /// Images are the files with an accepted extension, outside `exclude` (the output's own
    /// prefix when it lies inside the input). The i-th image in name order belongs to task
    /// `i % count`: shares differ by at most one image, and the assignment depends on the
    /// listing alone. An input whose output is in `existing` is settled as skipped, so a rerun
    /// redoes nothing; one whose name cannot be an output name, or whose output name an
    /// earlier input already takes (`a.jpg` and `a.png` both make `a.png`), is settled as failed.
    pub fn new(
        inputs: &[Listed],
        exclude: Option<&str>,
        extension: &str,
        existing: &HashSet<String>,
        task: Task,
    ) -> Self {
        let mut plan = Plan::default();
        let mut taken = HashSet::new();
        let excluded = |name: &str| match exclude {
            Some(prefix) if !prefix.is_empty() => name
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('/')),
            _ => false,
        };
        for listed in inputs {
            if excluded(&listed.name) {
                continue;
            }
            if let Some((code, reason)) = &listed.unreadable {
                // Whatever its name, an entry that cannot be read is reported by the one task
                // that owns its position, so it never vanishes from the manifests.
                let ordinal = plan.images;
                plan.images += 1;
                if ordinal % task.count == task.index {
                    let position = plan.work.len() + plan.settled.len();
                    plan.settled.push(Record::settled(
                        position,
                        &listed.name,
                        "",
                        0,
                        Status::Failed,
                        Some((code, reason.clone())),
                    ));
                }
                continue;
            }
            let Some((stem, input_extension)) = listed.name.rsplit_once('.') else {
                plan.ignored += 1;
                continue;
            };
            if input_extension.contains('/')
                || ImageFormat::from_extension(input_extension).is_none()
            {
                plan.ignored += 1;
                continue;
            }
            let ordinal = plan.images;
            plan.images += 1;
            let output = format!("{stem}.{extension}");
            let first_claim = taken.insert(output.clone());
            if ordinal % task.count != task.index {
                continue;
            }
            let position = plan.work.len() + plan.settled.len();
            let record = |status, error: Option<(&str, String)>| {
                Record::settled(position, &listed.name, &output, listed.size, status, error)
            };
            if let Err(reason) = check_name(&listed.name) {
                plan.settled.push(record(
                    Status::Failed,
                    Some(("invalid_name", reason.to_string())),
                ));
            } else if !first_claim {
                plan.settled.push(record(
                    Status::Failed,
                    Some((
                        "output_collision",
                        format!("another input already makes {output}"),
                    )),
                ));
            } else if existing.contains(&output) {
                plan.settled.push(record(Status::Skipped, None));
            } else {
                plan.work.push(Work {
                    position,
                    input: listed.name.clone(),
                    output,
                    size: listed.size,
                });
            }
        }
        plan
    }

    /// Inputs this task owns.
    pub fn len(&self) -> usize {
        self.work.len() + self.settled.len()
    }

    /// Whether this task owns no input.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Refuses names that could escape the output (`..`, absolute paths, empty parts) or that
/// cannot be a file name, as object names in a bucket may be anything.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.starts_with('/') || name.contains('\\') || name.contains('\0') {
        return Err("the name is absolute or holds a backslash or NUL");
    }
    if name
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err("the name has an empty, `.` or `..` part");
    }
    if name.split('/').next() == Some(MANIFEST_DIR) {
        return Err("the name lies under the manifests' directory");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(names: &[&str]) -> Vec<Listed> {
        let mut listed: Vec<Listed> = names
            .iter()
            .map(|name| Listed {
                name: name.to_string(),
                size: 10,
                unreadable: None,
            })
            .collect();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        listed
    }

    fn plan(names: &[&str], exclude: Option<&str>, existing: &[&str], task: Task) -> Plan {
        let existing = existing.iter().map(|s| s.to_string()).collect();
        Plan::new(&listed(names), exclude, "png", &existing, task)
    }

    #[test]
    fn shares_cover_every_image_exactly_once() {
        let names: Vec<String> = (0..10).map(|i| format!("d{}/img{i}.jpg", i % 3)).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut seen = Vec::new();
        for index in 0..3 {
            let plan = plan(&names, None, &[], Task { index, count: 3 });
            assert!((3..=4).contains(&plan.work.len()), "{plan:?}");
            assert_eq!(plan.images, 10);
            seen.extend(plan.work.into_iter().map(|w| w.input));
        }
        seen.sort();
        let mut expected: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn outputs_keep_the_tree_and_change_the_extension() {
        let plan = plan(
            &["a/b.JPG", "c.webp", "notes.txt", "README", "x.y/z"],
            None,
            &[],
            Task { index: 0, count: 1 },
        );
        let outputs: Vec<&str> = plan.work.iter().map(|w| w.output.as_str()).collect();
        assert_eq!(outputs, ["a/b.png", "c.png"]);
        assert_eq!(plan.ignored, 3);
    }

    #[test]
    fn existing_outputs_are_skipped_and_collisions_refused() {
        let plan = plan(
            &["a.jpg", "a.png", "b.jpg"],
            None,
            &["b.png"],
            Task { index: 0, count: 1 },
        );
        assert_eq!(plan.work.len(), 1);
        assert_eq!(plan.work[0].input, "a.jpg");
        let settled: Vec<(&str, Status, Option<&str>)> = plan
            .settled
            .iter()
            .map(|r| (r.input.as_str(), r.status, r.error.as_deref()))
            .collect();
        assert_eq!(
            settled,
            [
                ("a.png", Status::Failed, Some("output_collision")),
                ("b.jpg", Status::Skipped, None)
            ]
        );
    }

    #[test]
    fn unreadable_entries_are_recorded_once_whatever_their_name() {
        let mut inputs = listed(&["a.jpg", "b.jpg"]);
        inputs.push(Listed {
            name: "fifo".to_string(),
            size: 0,
            unreadable: Some(("not_regular_file", "it is a FIFO".to_string())),
        });
        let mut recorded = Vec::new();
        for index in 0..2 {
            let plan = Plan::new(
                &inputs,
                None,
                "png",
                &HashSet::new(),
                Task { index, count: 2 },
            );
            assert_eq!(plan.images, 3);
            recorded.extend(plan.settled.into_iter().map(|r| (r.input, r.error)));
        }
        assert_eq!(
            recorded,
            [("fifo".to_string(), Some("not_regular_file".to_string()))]
        );
    }

    #[test]
    fn names_that_escape_are_refused_and_the_output_is_excluded() {
        let plan = plan(
            &[
                "../x.jpg",
                "a//b.jpg",
                "out/c.jpg",
                "output/d.jpg",
                "_manifests/e.jpg",
            ],
            Some("out"),
            &[],
            Task { index: 0, count: 1 },
        );
        assert_eq!(plan.work.len(), 1);
        assert_eq!(plan.work[0].input, "output/d.jpg");
        assert_eq!(plan.settled.len(), 3);
        assert!(
            plan.settled
                .iter()
                .all(|r| r.error.as_deref() == Some("invalid_name"))
        );
    }
}
