//! Client-facing operations behind the HTTP routes: pre-heat
//! (`/request/<filter>`), with their request and response types. Enqueues
//! and reads storage; never downloads, renders or calls back.

use std::sync::Arc;

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::filter::FilterSet;
use crate::index::Index;
use crate::keys;
use crate::queue::{now_millis, Job, Priority, Queue};
use crate::security::NetworkPolicy;
use crate::storage::{MediaRecord, Storage};

/// What the front and the API share.
pub struct Context {
    pub config: Arc<Config>,
    pub filters: Arc<FilterSet>,
    pub storage: Storage,
    pub index: Arc<Index>,
    pub queue: Arc<dyn Queue>,
    pub policy: NetworkPolicy,
    pub public_base: String,
}

/// The answer to a pre-heat request.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PreheatAnswer {
    pub code: String,
    pub path: String,
    pub url: String,
    pub filter: String,
    /// `pending` or `done`.
    pub status: &'static str,
    pub original_url: String,
    /// Whether this request added a job (false: one was already in flight or nothing to do).
    pub queued: bool,
    pub record: Option<MediaRecord>,
}

impl Context {
    /// Validates, answers from storage when the variant exists, and
    /// otherwise enqueues one pre-heat job (deduped) with the callback.
    pub async fn preheat(
        &self,
        filter: &str,
        url: Option<&str>,
        callback: Option<&str>,
    ) -> Result<PreheatAnswer> {
        self.filters.get(filter)?;
        let url = url
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Error::BadRequest("query parameter `url` is required".into()))?;
        let parsed = crate::security::parse_outbound_url(url, &self.policy)?;
        if let Some(callback) = callback {
            crate::security::parse_outbound_url(callback, &self.policy)?;
        }
        let root = &self.config.storage.default_root;
        let code = keys::media_code(url, root);
        let record = self.storage.media_record(&code).await?;
        // The path is fixed at first sight so the URL handed out now stays valid.
        let path = record
            .as_ref()
            .and_then(|r| r.path.clone())
            .unwrap_or_else(|| {
                let ext = keys::extension_from_url(&parsed).unwrap_or("img");
                keys::original_path(root, self.config.storage.default_approx, &code, ext)
            });
        if record.is_none() {
            // Known from now on, so a page asking for the variant gets 202, not 404.
            self.storage
                .create_media_record(&MediaRecord {
                    code: code.clone(),
                    root: root.clone(),
                    path: Some(path.clone()),
                    original_url: Some(url.to_string()),
                    marking: "new".into(),
                    updated_at: crate::storage::now_secs(),
                    ..Default::default()
                })
                .await?;
        }
        let variant = keys::variant_path(filter, &path);
        let exists = self.index.locate(&self.storage, &variant).await?.is_some();
        let queued = if exists && callback.is_none() {
            false
        } else {
            // Even when the variant exists a callback was asked for: the
            // worker sends it, since the front makes no outbound calls.
            let filters = vec![filter.to_string()];
            let job = Job {
                id: keys::job_id(),
                priority: Priority::Preheat,
                dedupe: keys::dedupe_key(&path, &filters),
                original: path.clone(),
                source_url: Some(url.to_string()),
                root: root.clone(),
                code: code.clone(),
                filters,
                enqueued_at_ms: now_millis(),
            };
            self.queue.enqueue(&job, callback).await?
        };
        Ok(PreheatAnswer {
            url: keys::variant_url(&self.public_base, filter, &path),
            code,
            path,
            filter: filter.to_string(),
            status: if exists { "done" } else { "pending" },
            original_url: url.to_string(),
            queued,
            record,
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
        let filters = vec![filter.to_string()];
        let root = original.split('/').next().unwrap_or_default().to_string();
        let code = keys::code_from_path(original)
            .map(str::to_string)
            .unwrap_or_else(|| keys::media_code(original, ""));
        let job = Job {
            id: keys::job_id(),
            priority: Priority::Urgent,
            dedupe: keys::dedupe_key(original, &filters),
            original: original.to_string(),
            source_url,
            root,
            code,
            filters,
            enqueued_at_ms: now_millis(),
        };
        self.queue.enqueue(&job, None).await
    }
}
