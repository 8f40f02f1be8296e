//! Which checkpoints to delete after a commit (a pure rule, [`plan_retention`]),
//! and deleting them.
//!
//! Kept: the newest `keep_last` committed checkpoints that verified (or were
//! never loaded), every step that is a multiple of `keep_every`, anything
//! pinned by a reader of this process, and anything newer than the commit
//! that triggered the pass (not ours to judge: a checkpoint to be replaced,
//! or another branch). Step directories without a manifest older than that
//! commit are crashed saves: removed. On local disks, so are the staging
//! files a killed put left in them (see [`remove_staging_files`]).

use super::checkpointer::Shared;
use super::layout::{self, MANIFEST};
use super::pins;
use super::writer::delete_all;
use super::{CommitInfo, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// What one retention pass deletes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetentionPlan {
    /// Committed checkpoints to delete.
    pub delete: Vec<u64>,
    /// Step directories without a manifest (saves that never committed).
    pub incomplete: Vec<u64>,
}

/// The retention rule. `steps` are (step, committed) for every step
/// directory of a stage; `current` is the step just committed.
pub fn plan_retention(
    steps: &[(u64, bool)],
    current: u64,
    keep_last: usize,
    keep_every: Option<u64>,
    pinned: impl Fn(u64) -> bool,
    known_bad: impl Fn(u64) -> bool,
) -> RetentionPlan {
    let considered = steps.iter().filter(|(s, _)| *s <= current);
    let mut good: Vec<u64> = considered
        .clone()
        .filter(|&&(s, committed)| committed && (s == current || !known_bad(s)))
        .map(|&(s, _)| s)
        .collect();
    good.sort_unstable();
    let newest: BTreeSet<u64> = good.into_iter().rev().take(keep_last.max(1)).collect();
    let kept = |s: u64| {
        s == current
            || newest.contains(&s)
            || keep_every.is_some_and(|m| m > 0 && s.is_multiple_of(m))
            || pinned(s)
    };
    let mut plan = RetentionPlan::default();
    for &(step, committed) in considered {
        if committed && !kept(step) {
            plan.delete.push(step);
        } else if !committed && step < current && !pinned(step) {
            plan.incomplete.push(step);
        }
    }
    plan
}

/// Applies the rule to `stage` after the commit in `info`, recording what
/// went in `info`.
pub async fn apply(shared: &Shared, info: &mut CommitInfo) -> Result<()> {
    let run = &shared.run;
    let stage = info.stage.as_str();
    // A writer of an older group prunes nothing: what it would delete may
    // be the newer group's upload in progress.
    if let Some(mine) = shared.config.fence {
        super::fence::check(run, mine).await?;
    }
    if let Some(stage_dir) = layout::local_dir(run, &layout::stage_path(run, stage)) {
        remove_staging_files(&stage_dir, info.step);
    }
    let mut dirs = layout::scan(run, stage).await?;
    let steps: Vec<(u64, bool)> = dirs.iter().map(|(&s, d)| (s, d.committed)).collect();
    let dir_url = |step: u64| run.describe(&layout::step_path(run, stage, step));
    let plan = plan_retention(
        &steps,
        info.step,
        shared.config.keep_last,
        shared.config.keep_every,
        |s| pins::is_pinned(&dir_url(s)),
        |s| shared.is_bad(stage, s),
    );
    for (step, committed) in plan
        .delete
        .iter()
        .map(|&s| (s, true))
        .chain(plan.incomplete.iter().map(|&s| (s, false)))
    {
        // Checked again right before deleting: a load may have started.
        if pins::is_pinned(&dir_url(step)) {
            continue;
        }
        let dir = layout::step_path(run, stage, step);
        let mut objects = dirs.remove(&step).map(|d| d.objects).unwrap_or_default();
        if committed {
            // The manifest goes first: a pass cut short leaves an
            // incomplete directory (cleaned up next time), never a
            // checkpoint with objects missing.
            let manifest = layout::child(&dir, MANIFEST);
            objects.retain(|p| *p != manifest);
            delete_all(run, vec![manifest]).await?;
        }
        delete_all(run, objects).await?;
        if let Some(local) = layout::local_dir(run, &dir) {
            layout::remove_empty_dirs(&local);
        }
        if committed {
            tracing::info!("{}: deleted by retention", dir_url(step));
            info.deleted.push(step);
        } else {
            tracing::info!(
                "{}: removed an incomplete checkpoint (a save that never committed)",
                dir_url(step)
            );
            info.removed_incomplete.push(step);
        }
    }
    Ok(())
}

/// Whether `name` is one of object_store's local staging files,
/// `<name>#<digits>` (the rule its `LocalFileSystem` uses to hide them from
/// listings). Checkpoint names never hold a `#` (`validate_object_name`),
/// so under a stage directory such a name can be nothing else.
fn is_staging_name(name: &str) -> bool {
    name.split_once('#').is_some_and(|(base, digits)| {
        !base.is_empty() && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Removes the staging files left under a local stage directory by puts
/// that were killed before their rename (`<object>#1`, `manifest.json#2`,
/// `latest#1`): listings hide them, so the pass above never sees them and
/// they would stay forever, keeping their directories too.
///
/// Only files that no put of this process is writing: this runs right after
/// the commit of `current`, inside the one task that saves (a
/// `Checkpointer` has at most one save in flight, and there is one writer
/// per run), so every put of ours has finished. For step directories it
/// also keeps to steps older than `current`, like the removal of crashed
/// saves: a newer step may be another writer's save in progress.
fn remove_staging_files(stage_dir: &Path, current: u64) {
    let Ok(entries) = std::fs::read_dir(stage_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir && is_staging_name(&name) {
            remove_staging_file(&path);
        } else if is_dir && layout::parse_step_dir(&name).is_some_and(|step| step < current) {
            remove_staging_below(&path);
            // A save killed during its first put leaves nothing else.
            layout::remove_empty_dirs(&path);
        }
    }
}

fn remove_staging_below(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => remove_staging_below(&path),
            Ok(t) if t.is_file() && is_staging_name(&entry.file_name().to_string_lossy()) => {
                remove_staging_file(&path)
            }
            _ => {}
        }
    }
}

fn remove_staging_file(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => tracing::info!(
            "{}: removed a staging file of an interrupted write",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!("{}: cannot remove this staging file: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        saves: impl IntoIterator<Item = u64>,
        keep_last: usize,
        keep_every: Option<u64>,
    ) -> Vec<u64> {
        let mut present: Vec<(u64, bool)> = Vec::new();
        for step in saves {
            present.push((step, true));
            let plan = plan_retention(&present, step, keep_last, keep_every, |_| false, |_| false);
            assert!(plan.incomplete.is_empty());
            present.retain(|(s, _)| !plan.delete.contains(s));
        }
        present.into_iter().map(|(s, _)| s).collect()
    }

    #[test]
    fn keeps_the_last_k_and_every_mth() {
        // After each of 12 saves, exactly the last 2 plus multiples of 5.
        let mut present: Vec<(u64, bool)> = Vec::new();
        for step in 1..=12u64 {
            present.push((step, true));
            let plan = plan_retention(&present, step, 2, Some(5), |_| false, |_| false);
            present.retain(|(s, _)| !plan.delete.contains(s));
            let kept: Vec<u64> = present.iter().map(|(s, _)| *s).collect();
            let expected: Vec<u64> = (1..=step).filter(|&s| s + 2 > step || s % 5 == 0).collect();
            assert_eq!(kept, expected, "after step {step}");
        }
        assert_eq!(run(1..=12, 2, Some(5)), [5, 10, 11, 12]);
        assert_eq!(run((100..=1200).step_by(100), 3, None), [1000, 1100, 1200]);
    }

    #[test]
    fn never_deletes_the_newest_pinned_or_newer_ones() {
        // keep_last 0 still keeps the newest.
        assert_eq!(run(1..=4, 0, None), [4]);
        let steps = [(1, true), (2, true), (3, true), (4, true), (9, true)];
        let plan = plan_retention(&steps, 4, 1, None, |s| s == 2, |_| false);
        assert_eq!(
            plan.delete,
            [1, 3],
            "2 is pinned, 9 is newer than the commit"
        );
    }

    #[test]
    fn staging_names_follow_object_store() {
        for name in ["x#3", "model.safetensors#1", "manifest.json#12", "latest#1"] {
            assert!(is_staging_name(name), "{name}");
        }
        for name in ["x", "x#", "#3", "x#3a", "x#-1", "model.safetensors"] {
            assert!(!is_staging_name(name), "{name}");
        }
    }

    #[test]
    fn known_bad_checkpoints_do_not_count_and_orphans_go() {
        // 3 failed verification: the last two good ones are 2 and 4.
        let steps = [(1, true), (2, true), (3, true), (4, true)];
        let plan = plan_retention(&steps, 4, 2, None, |_| false, |s| s == 3);
        assert_eq!(plan.delete, [1, 3]);
        // Incomplete directories older than the commit go; a newer one (a
        // save in progress elsewhere) and a pinned one stay.
        let steps = [(1, false), (2, true), (3, false), (4, true), (5, false)];
        let plan = plan_retention(&steps, 4, 5, None, |s| s == 3, |_| false);
        assert_eq!(plan.incomplete, [1]);
        assert!(plan.delete.is_empty());
    }
}
