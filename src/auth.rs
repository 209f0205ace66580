//! The auth manager: the credentials a miner's `mining.authorize` and `mining.submit` carry
//! upstream, rewritten through `user_template` when one is set.

use crate::config::PoolConfig;

#[derive(Debug, Clone, Default)]
pub struct AuthManager {
    /// `{pool_user}`, `{worker}` and `{user}` are replaced; empty means miners' own credentials.
    template: String,
}

/// The user and password to present upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl AuthManager {
    pub fn new(template: &str) -> Self {
        Self { template: template.to_owned() }
    }

    pub fn rewrites(&self) -> bool {
        !self.template.is_empty()
    }

    /// The upstream user for what a miner sent. The worker is the part after the first `.`, or
    /// the whole name when it has none.
    pub fn upstream_user(&self, miner_user: &str, pool: &PoolConfig) -> String {
        if self.template.is_empty() {
            return miner_user.to_owned();
        }
        let worker = miner_user.split_once('.').map_or(miner_user, |(_, w)| w);
        self.template.replace("{pool_user}", &pool.user).replace("{worker}", worker).replace("{user}", miner_user)
    }

    /// The credentials to authorize upstream with: the pool's password when rewriting, since the
    /// pool account is then the pool's, else the miner's own.
    pub fn credentials(&self, miner_user: &str, miner_password: &str, pool: &PoolConfig) -> Credentials {
        Credentials {
            user: self.upstream_user(miner_user, pool),
            password: if self.rewrites() { pool.password.clone() } else { miner_password.to_owned() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolConfig {
        PoolConfig { url: "stratum+tcp://p:1".into(), user: "acct".into(), password: "pw".into() }
    }

    #[test]
    fn off_by_default() {
        let a = AuthManager::default();
        assert_eq!(
            a.credentials("farm.rig1", "x", &pool()),
            Credentials { user: "farm.rig1".into(), password: "x".into() }
        );
    }

    #[test]
    fn template_rewrites_worker() {
        let a = AuthManager::new("{pool_user}.{worker}");
        assert_eq!(
            a.credentials("farm.rig1", "x", &pool()),
            Credentials { user: "acct.rig1".into(), password: "pw".into() }
        );
        assert_eq!(a.upstream_user("rig2", &pool()), "acct.rig2");
        assert_eq!(a.upstream_user("farm.rack.7", &pool()), "acct.rack.7");
        assert_eq!(AuthManager::new("{pool_user}_{user}").upstream_user("a.b", &pool()), "acct_a.b");
    }
}
