//! Purge: removes an original's variants (optionally the original and its
//! media record too) from storage first, then from every index, so they are
//! rendered again on demand; or every variant of one filter, after its
//! definition changed. Needs the admin key or the key of the account that
//! owns the root.

use serde::Serialize;

use super::{Caller, Context};
use crate::error::{Error, Result};
use crate::filter::{is_variant_filter_name, Preset};
use crate::keys;

/// What a purge removed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Purged {
    /// Storage paths of the variants that were stored.
    pub variants: Vec<String>,
    /// The original's storage path, when it was removed.
    pub original: Option<String>,
    /// The media code whose record was removed.
    pub record: Option<String>,
}

impl Context {
    /// Purges what the media record of `code` points at.
    pub async fn purge_media(
        &self,
        caller: &Caller,
        code: &str,
        with_original: bool,
    ) -> Result<Purged> {
        let record = self.media(caller, code).await?;
        self.require_owner(caller, &record.root)?;
        let mut purged = match &record.path {
            Some(path) => self.purge_path(caller, None, path, with_original).await?,
            None => Purged::default(),
        };
        if with_original && purged.record.is_none() {
            self.storage
                .delete(&keys::media_record_path(&record.code))
                .await?;
            purged.record = Some(record.code);
        }
        Ok(purged)
    }

    /// Purges the variants of the original at `path`: of one filter, or of
    /// every filter (configured now or found in storage) when `filter` is None.
    pub async fn purge_path(
        &self,
        caller: &Caller,
        filter: Option<&str>,
        path: &str,
        with_original: bool,
    ) -> Result<Purged> {
        let path = crate::security::normalize_path(path, self.config.server.max_path_bytes)?;
        keys::validate_original_path(&path)?;
        let root = path.split('/').next().unwrap_or_default();
        self.require_owner(caller, root)?;
        let filters = match filter {
            Some(name) => self.stored_segments(checked_filter_name(name)?),
            None => self.filter_names().await?,
        };
        let mut purged = Purged::default();
        for filter in filters {
            let variant = keys::variant_path(&filter, &path);
            if self.storage.head(&variant).await?.is_some() {
                self.storage.delete(&variant).await?;
                purged.variants.push(variant.clone());
            }
            // Also when absent: the index may still hold an entry or a failure.
            self.index.forget(&variant).await?;
        }
        if !with_original && !purged.variants.is_empty() {
            if let Some(code) = keys::code_from_path(&path) {
                self.forget_in_record(code, &purged.variants).await?;
            }
        }
        if with_original && self.storage.head(&path).await?.is_some() {
            self.storage.delete(&path).await?;
            purged.original = Some(path.to_string());
            if let Some(code) = keys::code_from_path(&path) {
                self.storage.delete(&keys::media_record_path(code)).await?;
                self.storage
                    .delete(&keys::account_media_marker(root, code))
                    .await?;
                purged.record = Some(code.to_string());
            }
        }
        Ok(purged)
    }

    /// Purges every stored variant of one filter (admin only): what to do
    /// after changing its definition, since variant paths carry no version.
    pub async fn purge_filter(&self, caller: &Caller, filter: &str) -> Result<Purged> {
        if !matches!(caller, Caller::Admin) {
            return Err(Error::Forbidden(
                "purging a whole filter needs the admin key".into(),
            ));
        }
        let filter = checked_filter_name(filter)?;
        let mut purged = Purged::default();
        for segment in self.stored_segments(filter) {
            for variant in self.storage.list(&format!("media/cache/{segment}")).await? {
                self.storage.delete(&variant).await?;
                self.index.forget(&variant).await?;
                purged.variants.push(variant);
            }
        }
        Ok(purged)
    }

    /// Makes the media record of `code` say its purged `variants` are to
    /// come again: a dispatch that waits for them, and `/media/<code>`,
    /// must not go on reporting them done.
    async fn forget_in_record(&self, code: &str, variants: &[String]) -> Result<()> {
        let filters: Vec<&str> = variants
            .iter()
            .filter_map(|variant| variant.strip_prefix("media/cache/")?.split('/').next())
            .collect();
        self.storage
            .update_media_record(code, |current| {
                let Some(mut record) = current else {
                    return (None, ());
                };
                let mut changed = false;
                for filter in &filters {
                    if let Some(thumb) = record.thumb_data.get_mut(*filter) {
                        *thumb = crate::storage::Thumb::pending();
                        changed = true;
                    }
                    changed |= record.resized.remove(*filter).is_some();
                }
                if !changed {
                    return (None, ());
                }
                if record.marking == "resized" && !record.thumb_data.values().any(|t| t.is_done()) {
                    record.marking = "downloaded".into();
                }
                record.updated_at = crate::storage::now_secs();
                (Some(record), ())
            })
            .await
    }

    /// Where `filter`'s variants are stored: an `auto` filter's negotiated
    /// variants live beside it; a filter no longer configured has only its own.
    fn stored_segments(&self, filter: &str) -> Vec<String> {
        match self.filters.get(filter) {
            Ok(preset) => preset.stored_segments(),
            Err(_) => vec![filter.to_string()],
        }
    }

    /// The configured filters and any other whose variants are in storage.
    async fn filter_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .filters
            .iter()
            .flat_map(Preset::stored_segments)
            .collect();
        names.extend(self.storage.child_dirs("media/cache").await?);
        names.sort_unstable();
        names.dedup();
        names.retain(|name| is_variant_filter_name(name));
        Ok(names)
    }

    /// Purging destroys: the admin, or the account that owns `root`; never anonymous.
    fn require_owner(&self, caller: &Caller, root: &str) -> Result<()> {
        match caller {
            Caller::Admin => Ok(()),
            Caller::Account(account) if account.root == root => Ok(()),
            Caller::Account(account) => Err(Error::Forbidden(format!(
                "the key of account {:?} cannot purge under {root:?}",
                account.root
            ))),
            Caller::Anonymous => Err(Error::Unauthorized(
                "purging needs the admin key or the account's key".into(),
            )),
        }
    }
}

/// A filter named in a purge: any valid name, since a filter removed from
/// the config may still have variants stored.
fn checked_filter_name(name: &str) -> Result<&str> {
    if is_variant_filter_name(name) {
        Ok(name)
    } else {
        Err(Error::UnknownFilter(name.chars().take(64).collect()))
    }
}
