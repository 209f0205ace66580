//! The job manager: which jobs a session's pool announced, and the difficulty each was sent at.
//!
//! A `mining.set_difficulty` applies to jobs notified after it; shares on earlier jobs keep the
//! difficulty in force when their job was sent.

use std::collections::VecDeque;

/// Jobs kept per session; older ones are forgotten first.
pub const MAX_JOBS: usize = 16;

#[derive(Debug, Default)]
pub struct JobBook {
    /// The difficulty for jobs notified from now on.
    difficulty: Option<f64>,
    /// (job id, difficulty it was sent at), oldest first.
    jobs: VecDeque<(Box<str>, Option<f64>)>,
}

impl JobBook {
    pub fn set_difficulty(&mut self, difficulty: f64) {
        self.difficulty = Some(difficulty);
    }

    pub fn difficulty(&self) -> Option<f64> {
        self.difficulty
    }

    pub fn on_notify(&mut self, job_id: &str, clean_jobs: bool) {
        if clean_jobs {
            self.jobs.clear();
        }
        self.jobs.retain(|(id, _)| &**id != job_id);
        if self.jobs.len() == MAX_JOBS {
            self.jobs.pop_front();
        }
        self.jobs.push_back((job_id.into(), self.difficulty));
    }

    /// The difficulty a share on `job_id` is judged at: its job's, or the current one for a job
    /// the book does not know.
    pub fn difficulty_for(&self, job_id: &str) -> Option<f64> {
        self.jobs.iter().rev().find(|(id, _)| &**id == job_id).map_or(self.difficulty, |(_, d)| *d)
    }

    pub fn knows(&self, job_id: &str) -> bool {
        self.jobs.iter().any(|(id, _)| &**id == job_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difficulty_is_bound_to_the_job() {
        let mut b = JobBook::default();
        b.set_difficulty(1.0);
        b.on_notify("a", true);
        b.set_difficulty(2.0);
        assert_eq!(b.difficulty_for("a"), Some(1.0));
        b.on_notify("b", false);
        assert_eq!(b.difficulty_for("a"), Some(1.0));
        assert_eq!(b.difficulty_for("b"), Some(2.0));
        assert_eq!(b.difficulty_for("zzz"), Some(2.0));
        b.on_notify("c", true);
        assert!(!b.knows("a") && !b.knows("b") && b.knows("c"));
    }

    #[test]
    fn bounded() {
        let mut b = JobBook::default();
        for i in 0..100 {
            b.on_notify(&i.to_string(), false);
        }
        assert_eq!(b.jobs.len(), MAX_JOBS);
        assert!(b.knows("99") && !b.knows("83") && b.knows("84"));
    }
}
