//! The SAIS client protocol: account set-up, batch dispatch, media records
//! by code or by ids, status. Request types accept what the PHP client
//! sends (every key `null`able, `[]` for empty maps, `approx` or
//! `estimated`, images as strings or `{url, context}` objects).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Caller, Context};
use crate::callback::Subscriber;
use crate::error::{Error, Result};
use crate::index::Located;
use crate::keys;
use crate::queue::{Job, Priority};
use crate::storage::{normalize_context, now_secs, Account, FailureSummary, MediaRecord, Thumb};

/// `POST /account_setup` body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct AccountSetup {
    pub root: Option<String>,
    pub approx: Option<u64>,
    /// The field's older name, still sent by some callers.
    pub estimated: Option<u64>,
    pub media_callback_url: Option<String>,
    pub thumb_callback_url: Option<String>,
    /// The key the account should have; a new account gets a generated one without it.
    pub api_key: Option<String>,
}

/// The account as `/account_setup` answers it: SAIS's `user.read` fields,
/// the `userIdentifier` its CLI reads, the media count and the credentials.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountAnswer {
    pub id: String,
    pub user_identifier: String,
    pub root: String,
    pub approx_image_count: u64,
    pub bin_count: u64,
    pub media_callback_url: Option<String>,
    pub thumb_callback_url: Option<String>,
    pub media_count: u64,
    /// The credentials, only to a caller that proved it may have them: the
    /// admin, the account's own key, or whoever just created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// True when this call created the account.
    pub created: bool,
    /// True when a different approx was asked for but the account already has media.
    pub approx_fixed: bool,
}

/// `POST /dispatch_process` body (SAIS's ProcessPayload).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessPayload {
    pub root: Option<String>,
    pub images: Option<Vec<ImageItem>>,
    pub filters: Option<Vec<String>>,
    pub context: Option<Value>,
    pub media_callback_url: Option<String>,
    pub thumb_callback_url: Option<String>,
    pub api_key: Option<String>,
    pub wait: Option<bool>,
}

/// One image of a dispatch: a URL, or an object with its own context.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ImageItem {
    Url(String),
    Object {
        url: String,
        #[serde(default)]
        context: Option<Value>,
    },
}

impl ImageItem {
    fn url(&self) -> &str {
        match self {
            ImageItem::Url(url) | ImageItem::Object { url, .. } => url,
        }
    }

    fn context(&self) -> Option<&Value> {
        match self {
            ImageItem::Url(_) => None,
            ImageItem::Object { context, .. } => context.as_ref().filter(|c| !is_empty_json(c)),
        }
    }
}

fn is_empty_json(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// A fresh account with a generated key (unless one is given) and webhook secret.
pub fn new_account(root: &str, approx: u64, api_key: Option<String>) -> Account {
    let now = now_secs();
    Account {
        root: root.to_string(),
        approx_image_count: approx,
        bin_count: keys::bin_count(approx),
        media_callback_url: None,
        thumb_callback_url: None,
        api_key: api_key.unwrap_or_else(crate::security::new_api_key),
        webhook_secret: crate::callback::new_webhook_secret(),
        created_at: now,
        updated_at: now,
    }
}

impl Context {
    /// Writes a media record unless one exists (false then, and nothing is
    /// written); a new one is counted for its account and its G3 code filed
    /// so newer clients find it.
    pub async fn create_media(&self, record: &MediaRecord) -> Result<bool> {
        if !self.storage.create_media_record(record).await? {
            return Ok(false);
        }
        self.storage
            .add_account_media(&record.root, &record.code)
            .await?;
        if let Some(url) = &record.original_url {
            self.storage
                .put_normalized_alias(&keys::normalized_code(url), &record.root, &record.code)
                .await?;
        }
        Ok(true)
    }

    /// Creates an account, or updates its callback URLs (and key, and approx
    /// while it has no media).
    pub async fn account_setup(
        &self,
        caller: &Caller,
        setup: AccountSetup,
    ) -> Result<AccountAnswer> {
        let root = setup
            .root
            .clone()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| Error::InvalidPayload("root - this value should not be blank".into()))?;
        if !(3..=50).contains(&root.len()) || keys::validate_root(&root).is_err() {
            return Err(Error::InvalidPayload(format!(
                "root - {root:?} must be 3 to 50 of [A-Za-z0-9_-] and not a reserved name"
            )));
        }
        let approx = setup.approx.or(setup.estimated);
        let media_callback =
            self.callback_url("mediaCallbackUrl", setup.media_callback_url.as_deref())?;
        let thumb_callback =
            self.callback_url("thumbCallbackUrl", setup.thumb_callback_url.as_deref())?;
        if let Some(key) = &setup.api_key {
            if key.len() < 16 || key.len() > 200 {
                return Err(Error::InvalidPayload(
                    "apiKey - must be 16 to 200 characters".into(),
                ));
            }
        }
        let existing = self.storage.account(&root).await?;
        let proven = match (caller, &existing) {
            (Caller::Admin, _) => true,
            (Caller::Account(account), _) => account.root == root,
            // A legacy client proves itself with the account's own key in the body.
            (Caller::Anonymous, Some(account)) => setup
                .api_key
                .as_deref()
                .is_some_and(|k| crate::security::keys_match(k, &account.api_key)),
            (Caller::Anonymous, None) => false,
        };
        // Without required keys, a caller with none acts on the root it
        // names: it may create one, or change an existing one's callbacks
        // and size, but not its key, and it is not told the credentials.
        // A wrong key is refused either way.
        let keyless = !self.config.auth.require_api_key
            && matches!(caller, Caller::Anonymous)
            && (existing.is_none() || setup.api_key.is_none());
        if !(proven || keyless) {
            return Err(match caller {
                Caller::Account(_) => Error::Forbidden(format!("this key cannot set up {root:?}")),
                _ => Error::Unauthorized("account set-up needs the admin key".into()),
            });
        }

        let (mut account, created) = match existing {
            Some(account) => (account, false),
            None => {
                let mut account = new_account(
                    &root,
                    approx.unwrap_or(self.config.sais.default_approx),
                    setup.api_key.clone(),
                );
                account.media_callback_url = media_callback.clone();
                account.thumb_callback_url = thumb_callback.clone();
                if self.storage.create_account(&account).await? {
                    self.file_key(&account.api_key, &root).await?;
                    (account, true)
                } else {
                    // Someone else created it a moment ago: update theirs,
                    // but a keyless caller does not choose its key.
                    if !proven && setup.api_key.is_some() {
                        return Err(Error::Unauthorized(format!(
                            "{root:?} was just set up by another caller"
                        )));
                    }
                    let theirs = self.storage.account(&root).await?;
                    (
                        theirs.ok_or_else(|| Error::UnknownAccount(root.clone()))?,
                        false,
                    )
                }
            }
        };
        let media_count = self.storage.account_media_count(&root).await?;
        let mut approx_fixed = false;
        if !created {
            // An account written by hand or imported may have none, and its
            // webhooks would go out unsigned.
            if account.webhook_secret.is_empty() {
                account.webhook_secret = crate::callback::new_webhook_secret();
            }
            if media_callback.is_some() {
                account.media_callback_url = media_callback;
            }
            if thumb_callback.is_some() {
                account.thumb_callback_url = thumb_callback;
            }
            if let Some(approx) = approx.filter(|a| *a != account.approx_image_count) {
                // Moving the bins would orphan every stored original.
                if media_count == 0 {
                    account.approx_image_count = approx;
                    account.bin_count = keys::bin_count(approx);
                } else {
                    approx_fixed = true;
                }
            }
            if let Some(key) = setup.api_key.filter(|k| *k != account.api_key) {
                self.storage
                    .delete_key_index(&super::key_digest(&account.api_key))
                    .await?;
                self.forget_key(&account.api_key).await;
                // A look-up of the new key may have been cached as unknown.
                self.file_key(&key, &root).await?;
                account.api_key = key;
            } else if proven {
                // Filed again, whoever created the account: one made on the
                // fly before its key was filed gets a key that works.
                self.file_key(&account.api_key, &root).await?;
            }
            account.updated_at = now_secs();
            self.storage.put_account(&account).await?;
        }
        Ok(AccountAnswer {
            id: account.root.clone(),
            user_identifier: account.root.clone(),
            root: account.root,
            approx_image_count: account.approx_image_count,
            bin_count: account.bin_count,
            media_callback_url: account.media_callback_url,
            thumb_callback_url: account.thumb_callback_url,
            media_count,
            api_key: (proven || created).then_some(account.api_key),
            webhook_secret: (proven || created).then_some(account.webhook_secret),
            created,
            approx_fixed,
        })
    }

    fn callback_url(&self, field: &str, url: Option<&str>) -> Result<Option<String>> {
        let Some(url) = url.filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        if url.len() > self.config.sais.max_url_bytes {
            return Err(Error::InvalidPayload(format!("{field} - URL too long")));
        }
        crate::security::parse_outbound_url(url, &self.policy)
            .map_err(|e| Error::InvalidPayload(format!("{field} - {e}")))?;
        Ok(Some(url.to_string()))
    }

    /// Records every distinct image, enqueues what is missing, and answers
    /// the records in request order (after processing, with `wait`).
    pub async fn dispatch(
        &self,
        caller: &Caller,
        payload: ProcessPayload,
    ) -> Result<Vec<MediaRecord>> {
        let root = self.root_for(caller, payload.root.as_deref())?;
        let account = self.account_for_root(&root).await?;
        let mut filters = match payload.filters.as_deref() {
            Some(f) if !f.is_empty() => f.to_vec(),
            _ => self.config.sais.default_filters.clone(),
        };
        let mut named = HashSet::new();
        filters.retain(|filter| named.insert(filter.clone()));
        if filters.len() > self.config.sais.max_filters {
            return Err(Error::InvalidPayload(format!(
                "filters - at most {} per dispatch (sais.max_filters)",
                self.config.sais.max_filters
            )));
        }
        for filter in &filters {
            self.filters.get(filter).map_err(|_| {
                Error::InvalidPayload(format!("filters - unknown filter {filter:?}"))
            })?;
        }
        let images = payload.images.unwrap_or_default();
        if images.len() > self.config.sais.max_images {
            return Err(Error::InvalidPayload(format!(
                "images - at most {} per dispatch",
                self.config.sais.max_images
            )));
        }
        let batch_context = payload.context.filter(|c| !is_empty_json(c));
        for context in images
            .iter()
            .filter_map(ImageItem::context)
            .chain(batch_context.as_ref())
        {
            if context.to_string().len() > self.config.sais.max_context_bytes {
                return Err(Error::InvalidPayload("context - too large".into()));
            }
        }
        let subscriber = Subscriber {
            root: root.clone(),
            media: self
                .callback_url("mediaCallbackUrl", payload.media_callback_url.as_deref())?
                .or(account.media_callback_url.clone()),
            thumb: self
                .callback_url("thumbCallbackUrl", payload.thumb_callback_url.as_deref())?
                .or(account.thumb_callback_url.clone()),
        };
        let wait = payload.wait.unwrap_or(false);

        let mut seen = HashSet::new();
        let mut rows = Vec::new();
        for image in &images {
            let url = image.url().trim();
            let code = keys::media_code(url, &root);
            if !seen.insert(code.clone()) {
                continue;
            }
            let context = image.context().or(batch_context.as_ref()).cloned();
            let record = self
                .dispatch_one(&account, url, &code, context, &filters, &subscriber, wait)
                .await?;
            rows.push(record);
        }
        if wait {
            rows = self.wait_for(rows, &filters).await?;
        }
        Ok(rows
            .into_iter()
            .map(|row| row.with_public_base(&self.public_base))
            .collect())
    }

    /// Finds or creates one media record and enqueues its job when it needs one.
    #[allow(clippy::too_many_arguments)]
    async fn dispatch_one(
        &self,
        account: &Account,
        url: &str,
        code: &str,
        context: Option<Value>,
        filters: &[String],
        subscriber: &Subscriber,
        wait: bool,
    ) -> Result<MediaRecord> {
        let root = &account.root;
        let refusal = if url.is_empty() {
            Some(Error::InvalidUrl("empty URL".into()))
        } else if url.len() > self.config.sais.max_url_bytes {
            Some(Error::InvalidUrl("URL too long".into()))
        } else {
            crate::security::parse_outbound_url(url, &self.policy).err()
        };
        let redispatched = self
            .redispatch(root, code, context.clone(), filters, refusal.as_ref())
            .await?;
        let record = match redispatched {
            Some(existing) => existing,
            None => {
                let mut fresh = MediaRecord {
                    context: normalize_context(context.clone().unwrap_or(Value::Null)),
                    ..MediaRecord::new(code, root, Some(url))
                };
                prepare_for_dispatch(&mut fresh, None, filters, refusal.as_ref());
                // Written whole, once; a dispatch that created it first wins.
                if self.create_media(&fresh).await? {
                    fresh
                } else {
                    self.redispatch(root, code, context, filters, refusal.as_ref())
                        .await?
                        .ok_or_else(|| {
                            Error::Internal(format!(
                                "media record {code} exists but cannot be read"
                            ))
                        })?
                }
            }
        };
        if record.marking == "failed" {
            return Ok(record);
        }

        if subscriber.is_empty() && self.all_stored(&record, filters).await? {
            return Ok(record);
        }
        let stem = keys::original_stem(root, account.approx_image_count, code);
        let original = record.path.clone().unwrap_or_default();
        let priority = if wait {
            Priority::Urgent
        } else {
            Priority::Preheat
        };
        let job = Job::new(
            priority,
            &original,
            Some(stem),
            Some(url.to_string()),
            root,
            code,
            filters.to_vec(),
        );
        let encoded = (!subscriber.is_empty()).then(|| subscriber.encode());
        self.queue.enqueue(&job, encoded.as_deref()).await?;
        Ok(record)
    }

    /// An existing record dispatched again, as stored now (a job may have
    /// written it since anyone read it): stored again only if that changed
    /// it. `None` when there is no record.
    async fn redispatch(
        &self,
        root: &str,
        code: &str,
        context: Option<Value>,
        filters: &[String],
        refusal: Option<&Error>,
    ) -> Result<Option<MediaRecord>> {
        self.storage
            .update_existing_media_record(code, |mut record| {
                if let Err(e) = super::owned_by(&record, root) {
                    return (None, Err(e));
                }
                let before = record.clone();
                prepare_for_dispatch(&mut record, context, filters, refusal);
                if record == before {
                    return (None, Ok(record));
                }
                record.updated_at = now_secs();
                (Some(record.clone()), Ok(record))
            })
            .await?
            .transpose()
    }

    /// Whether every requested variant is recorded as done and is in storage.
    async fn all_stored(&self, record: &MediaRecord, filters: &[String]) -> Result<bool> {
        let Some(path) = &record.path else {
            return Ok(false);
        };
        for filter in filters {
            let done = record.thumb_data.get(filter).is_some_and(Thumb::is_done);
            if !done
                || matches!(
                    self.index
                        .locate(&self.storage, &keys::variant_path(filter, path))
                        .await?,
                    Located::Missing(_)
                )
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Re-reads the rows until each is failed or has every filter done, or
    /// until `sais.wait_timeout_ms` passes; answers what is there by then.
    async fn wait_for(
        &self,
        mut rows: Vec<MediaRecord>,
        filters: &[String],
    ) -> Result<Vec<MediaRecord>> {
        let deadline = Instant::now() + Duration::from_millis(self.config.sais.wait_timeout_ms);
        let finished = |r: &MediaRecord| {
            r.marking == "failed"
                || filters.iter().all(|f| {
                    r.thumb_data
                        .get(f)
                        .is_some_and(|t| t.is_done() || t.marking == "failed")
                })
        };
        while Instant::now() < deadline && !rows.iter().all(finished) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for row in rows.iter_mut().filter(|r| !finished(r)) {
                if let Some(fresh) = self.storage.media_record(&row.code).await? {
                    *row = fresh;
                }
            }
        }
        Ok(rows)
    }

    /// A media record by its code, or by the G3 code a newer client computes.
    pub async fn media(&self, caller: &Caller, code: &str) -> Result<MediaRecord> {
        // Before any look-up: whether a code exists is not for anyone to ask.
        self.require_key(caller)?;
        if !keys::is_media_code(code) {
            return Err(Error::BadRequest(format!(
                "{code:?} is not a 16-hex-digit media code"
            )));
        }
        let code = code.to_ascii_lowercase();
        let record = match self.storage.media_record(&code).await? {
            Some(record) => Some(record),
            None => {
                let root = match caller {
                    Caller::Account(account) => Some(account.root.as_str()),
                    _ => None,
                };
                match self.storage.code_for_normalized(&code, root).await? {
                    Some(legacy) => self.storage.media_record(&legacy).await?,
                    None => None,
                }
            }
        };
        let record = record.ok_or_else(|| Error::UnknownMedia(code.clone()))?;
        if self.may_read(caller, &record.root) {
            Ok(record.with_public_base(&self.public_base))
        } else {
            // Another account's media is as good as absent.
            Err(Error::UnknownMedia(code))
        }
    }

    /// `fetch/media/by-ids`: the rows the v2 client reads; unknown ids and
    /// other accounts' media are left out.
    pub async fn media_by_ids(&self, caller: &Caller, ids: &[String]) -> Result<Vec<Value>> {
        self.require_key(caller)?;
        if ids.len() > self.config.sais.max_images {
            return Err(Error::InvalidPayload(format!(
                "ids - at most {} per request",
                self.config.sais.max_images
            )));
        }
        let mut rows = Vec::new();
        for id in ids {
            match self.media(caller, id.trim()).await {
                Ok(record) => rows.push(by_ids_row(id.trim(), &record)),
                Err(Error::UnknownMedia(_) | Error::BadRequest(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(rows)
    }

    /// `GET /status`: SAIS's health answer, plus the queue.
    pub async fn status(&self) -> Result<Value> {
        let depths = self.queue.depths().await?;
        Ok(json!({"status": "okay", "queue": depths}))
    }
}

fn by_ids_row(id: &str, record: &MediaRecord) -> Value {
    json!({
        "id": id,
        "code": record.code,
        "source": record.original_url,
        "thumbs": record.resized,
        "context": {"saisCode": record.code},
        "meta": {
            "mimeType": record.mime_type,
            "size": record.size,
            "width": record.original_width,
            "height": record.original_height,
            "blur": record.blur,
            "blurhash": record.blurhash,
            "context": record.context,
        },
        "marking": record.marking,
        "updatedAt": chrono::DateTime::from_timestamp(record.updated_at, 0)
            .map(|t| t.to_rfc3339()),
    })
}

/// What a dispatch asks of a record: its context, a pending thumb for each
/// filter not yet there, and either the refusal or, after a failure, a new try.
fn prepare_for_dispatch(
    record: &mut MediaRecord,
    context: Option<Value>,
    filters: &[String],
    refusal: Option<&Error>,
) {
    if let Some(context) = context {
        record.context = normalize_context(context);
    }
    for filter in filters {
        let thumb = record
            .thumb_data
            .entry(filter.clone())
            .or_insert_with(Thumb::pending);
        // A new dispatch is a new try, for a variant as for the media.
        if thumb.marking == "failed" {
            *thumb = Thumb::pending();
        }
    }
    if let Some(error) = refusal {
        // Refused before any download: the row says why; no job.
        record.marking = "failed".into();
        record.error = Some(FailureSummary {
            code: error.code().into(),
            message: error.to_string(),
        });
    } else if record.marking == "failed" {
        // A new dispatch is a new try.
        record.marking = if record.path.is_some() {
            "downloaded"
        } else {
            "new"
        }
        .into();
        record.error = None;
    }
}
