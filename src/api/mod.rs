//! Client-facing operations behind the HTTP routes: who is calling
//! (`Caller`), pre-heat (`/request/<filter>`), cache-miss enqueues, and the
//! SAIS protocol (`sais`, `tools`). Enqueues and reads storage; never
//! downloads, renders or calls back.

pub mod purge;
pub mod sais;
pub mod tools;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::callback::Subscriber;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::filter::FilterSet;
use crate::index::{Index, Located};
use crate::keys;
use crate::queue::{Job, Priority, Queue};
use crate::security::{keys_match, NetworkPolicy};
use crate::storage::{Account, MediaRecord, Storage};

/// What the front and the API share.
pub struct Context {
    pub config: Arc<Config>,
    pub filters: Arc<FilterSet>,
    pub storage: Storage,
    pub index: Arc<Index>,
    pub queue: Arc<dyn Queue>,
    pub policy: NetworkPolicy,
    pub public_base: String,
    /// The admin key in force (configured, or generated at start).
    pub admin_key: String,
    /// API key digest to account root, briefly, so a key is not a storage read per request.
    key_roots: moka::future::Cache<String, Option<String>>,
}

/// Who is calling, from the key presented.
#[derive(Debug, Clone)]
pub enum Caller {
    /// Holds the admin key: may set up accounts and act on any root.
    Admin,
    /// Holds an account's key: acts on that account's root only.
    Account(Box<Account>),
    /// Presented no key (only let in when `auth.require_api_key` is off).
    Anonymous,
}

/// The answer to a pre-heat request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreheatAnswer {
    pub code: String,
    pub path: String,
    pub url: String,
    pub filter: String,
    /// `pending`, `done` or `failed`.
    pub status: &'static str,
    pub original_url: String,
    /// Whether this request added a job (false: one was already in flight or nothing to do).
    pub queued: bool,
    pub record: Option<MediaRecord>,
    /// For `failed`: the HTTP status of the remembered failure.
    #[serde(skip)]
    pub failure_status: Option<u16>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        filters: Arc<FilterSet>,
        storage: Storage,
        index: Arc<Index>,
        queue: Arc<dyn Queue>,
        policy: NetworkPolicy,
        admin_key: String,
    ) -> Context {
        Context {
            public_base: config.public_base(),
            config,
            filters,
            storage,
            index,
            queue,
            policy,
            admin_key,
            key_roots: moka::future::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(30))
                .build(),
        }
    }

    /// Identifies the caller by the key it presented (Bearer, `apiKey` or
    /// `?token=`). A key that matches nothing is refused outright, never
    /// treated as no key.
    pub async fn caller(&self, presented: Option<&str>) -> Result<Caller> {
        let Some(key) = presented.filter(|k| !k.is_empty()) else {
            return Ok(Caller::Anonymous);
        };
        if keys_match(key, &self.admin_key) {
            return Ok(Caller::Admin);
        }
        let digest = key_digest(key);
        let storage = self.storage.clone();
        let lookup = digest.clone();
        let root = self
            .key_roots
            .try_get_with(digest, async move { storage.root_for_key(&lookup).await })
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        if let Some(root) = root {
            if let Some(account) = self.storage.account(&root).await? {
                if keys_match(key, &account.api_key) {
                    return Ok(Caller::Account(Box::new(account)));
                }
            }
        }
        Err(Error::Unauthorized("unknown API key".into()))
    }

    /// Files `key` as `root`'s, and forgets a cached "unknown" for it.
    pub(crate) async fn file_key(&self, key: &str, root: &str) -> Result<()> {
        self.storage.put_key_index(&key_digest(key), root).await?;
        self.forget_key(key).await;
        Ok(())
    }

    /// Refuses a caller without a key when keys are required.
    pub(crate) fn require_key(&self, caller: &Caller) -> Result<()> {
        if matches!(caller, Caller::Anonymous) && self.config.auth.require_api_key {
            return Err(Error::Unauthorized("an API key is required".into()));
        }
        Ok(())
    }

    /// Forgets cached key look-ups after a key changes.
    pub(crate) async fn forget_key(&self, key: &str) {
        self.key_roots.invalidate(&key_digest(key)).await;
    }

    /// The root a caller acts on: the one it names, which must be its own
    /// unless it is the admin; an account's key names its own by default.
    pub fn root_for(&self, caller: &Caller, named: Option<&str>) -> Result<String> {
        let named = named.filter(|r| !r.is_empty());
        match (caller, named) {
            (Caller::Account(account), None) => Ok(account.root.clone()),
            (Caller::Account(account), Some(root)) if root == account.root => Ok(root.to_string()),
            (Caller::Account(account), Some(root)) => Err(Error::Forbidden(format!(
                "the key of account {:?} cannot act on root {root:?}",
                account.root
            ))),
            (Caller::Anonymous, _) if self.config.auth.require_api_key => Err(Error::Unauthorized(
                "an API key is required (Authorization: Bearer, apiKey or ?token=)".into(),
            )),
            (Caller::Admin | Caller::Anonymous, Some(root)) => {
                keys::validate_root(root)
                    .map_err(|e| Error::InvalidPayload(format!("root - {e}")))?;
                Ok(root.to_string())
            }
            (Caller::Admin | Caller::Anonymous, None) => Err(Error::InvalidPayload(
                "root - this value should not be blank".into(),
            )),
        }
    }

    /// Whether a caller may read what is stored under `root`.
    pub fn may_read(&self, caller: &Caller, root: &str) -> bool {
        match caller {
            Caller::Admin => true,
            Caller::Account(account) => account.root == root,
            Caller::Anonymous => !self.config.auth.require_api_key,
        }
    }

    /// The account of a root, created on the fly for the configured default
    /// root (so `/request` works without any set-up).
    pub async fn account_for_root(&self, root: &str) -> Result<Account> {
        if let Some(account) = self.storage.account(root).await? {
            return Ok(account);
        }
        if root != self.config.storage.default_root {
            return Err(Error::UnknownAccount(root.to_string()));
        }
        let account = sais::new_account(root, self.config.storage.default_approx, None);
        if self.storage.create_account(&account).await? {
            // Its key works as any account's does, once set-up hands it out.
            self.file_key(&account.api_key, root).await?;
        }
        // Whoever created it first wins; read back the one that exists.
        self.storage
            .account(root)
            .await?
            .ok_or_else(|| Error::UnknownAccount(root.to_string()))
    }

    /// Validates, answers from storage when the variant exists, and
    /// otherwise enqueues one pre-heat job (deduped) with the callback.
    pub async fn preheat(
        &self,
        caller: &Caller,
        filter: &str,
        url: Option<&str>,
        callback: Option<&str>,
        root: Option<&str>,
    ) -> Result<PreheatAnswer> {
        self.filters.get(filter)?;
        // Trimmed and bounded as a dispatch's are: the URL makes the media
        // code, and both travel in the record, the job and every webhook.
        let url = url
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::BadRequest("query parameter `url` is required".into()))?;
        let callback = callback.map(str::trim).filter(|c| !c.is_empty());
        let max_url_bytes = self.config.sais.max_url_bytes;
        for (name, given) in [("url", Some(url)), ("callback", callback)] {
            if given.is_some_and(|given| given.len() > max_url_bytes) {
                return Err(Error::InvalidUrl(format!(
                    "{name} - longer than {max_url_bytes} bytes (sais.max_url_bytes)"
                )));
            }
        }
        let parsed = crate::security::parse_outbound_url(url, &self.policy)?;
        if let Some(callback) = callback {
            crate::security::parse_outbound_url(callback, &self.policy)?;
        }
        let root = match caller {
            Caller::Account(_) => self.root_for(caller, root)?,
            _ => self.root_for(
                caller,
                Some(root.unwrap_or(&self.config.storage.default_root)),
            )?,
        };
        keys::validate_root(&root)?;
        let account = self.account_for_root(&root).await?;
        let code = keys::media_code(url, &root);
        let record = self.storage.media_record(&code).await?;
        if let Some(record) = &record {
            owned_by(record, &root)?;
        }
        // The path is fixed at first sight so the URL handed out now stays valid.
        let path = record
            .as_ref()
            .and_then(|r| r.path.clone())
            .unwrap_or_else(|| {
                let ext = keys::extension_from_url(&parsed).unwrap_or("img");
                keys::original_path(&root, account.approx_image_count, &code, ext)
            });
        if record.is_none() {
            // Known from now on, so a page asking for the variant gets 202, not 404.
            self.create_media(&MediaRecord {
                path: Some(path.clone()),
                ..MediaRecord::new(&code, &root, Some(url))
            })
            .await?;
        }
        let variant = keys::variant_path(filter, &path);
        // Failed for good lately: answered now, not downloaded again (nor
        // called back again) until the failure expires.
        let (exists, failure) = match self.index.locate(&self.storage, &variant).await? {
            Located::Stored(..) => (true, None),
            Located::Missing(failure) => (false, failure),
        };
        let queued = if failure.is_some() || (exists && callback.is_none()) {
            false
        } else {
            // Even when the variant exists a callback was asked for: the
            // worker sends it, since the front makes no outbound calls.
            let job = Job::new(
                Priority::Preheat,
                &path,
                None,
                Some(url.to_string()),
                &root,
                &code,
                vec![filter.to_string()],
            );
            let subscriber = callback.map(|url| {
                Subscriber {
                    root: root.clone(),
                    media: None,
                    thumb: Some(url.to_string()),
                }
                .encode()
            });
            let marker = if exists {
                None
            } else {
                self.index.expect_render(&variant).await
            };
            self.queue
                .enqueue_marked(&job, subscriber.as_deref(), marker.as_ref())
                .await?
        };
        Ok(PreheatAnswer {
            url: keys::variant_url(&self.public_base, filter, &path),
            code,
            path,
            filter: filter.to_string(),
            status: match (exists, &failure) {
                (true, _) => "done",
                (false, Some(_)) => "failed",
                (false, None) => "pending",
            },
            original_url: url.to_string(),
            queued,
            record: record.map(|r| r.with_public_base(&self.public_base)),
            failure_status: failure.map(|f| f.status),
        })
    }

    /// The URL a not-yet-downloaded original will come from, if a pre-heat
    /// announced it.
    pub async fn pending_source(&self, original: &str) -> Result<Option<String>> {
        let Some(code) = keys::code_from_path(original) else {
            return Ok(None);
        };
        Ok(self
            .storage
            .media_record(code)
            .await?
            .filter(|r| r.path.as_deref() == Some(original) && r.marking != "failed")
            .and_then(|r| r.original_url))
    }

    /// Enqueues an urgent render for a cache miss: of a stored original, or
    /// of one a pre-heat is still downloading from `source_url`.
    pub async fn enqueue_miss(
        &self,
        filter: &str,
        original: &str,
        source_url: Option<String>,
    ) -> Result<bool> {
        let root = original.split('/').next().unwrap_or_default().to_string();
        let code = keys::code_from_path(original)
            .map(str::to_string)
            .unwrap_or_else(|| keys::media_code(original, ""));
        let job = Job::new(
            Priority::Urgent,
            original,
            None,
            source_url,
            &root,
            &code,
            vec![filter.to_string()],
        );
        let marker = self
            .index
            .expect_render(&keys::variant_path(filter, original))
            .await;
        self.queue.enqueue_marked(&job, None, marker.as_ref()).await
    }
}

/// A media record found by its code belongs to the root asking. SAIS codes
/// hash the URL's and the root's bytes run together, so another root's URL
/// can be made to share one (`a.jp` under `gshop`, `a.jpg` under `shop`):
/// it must not read or change this record.
fn owned_by(record: &crate::storage::MediaRecord, root: &str) -> Result<()> {
    if record.root == root {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "media code {} belongs to another root",
            record.code
        )))
    }
}

/// What an API key is filed under: its SHA-256, so storage never holds a
/// usable key index and a look-up leaks nothing about the key.
pub fn key_digest(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
