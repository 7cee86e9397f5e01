//! Downloads an original through the SSRF-guarded client: connect,
//! first-byte and total deadlines, a redirect cap, a byte cap enforced while
//! streaming, and a check that the bytes are an image kiln decodes.

use std::time::Duration;

use bytes::{Bytes, BytesMut};

use crate::config::FetchConfig;
use crate::error::{Error, Result};
use crate::imaging;
use crate::security::{classify_client_error, guarded_client, ClientLimits, NetworkPolicy};

/// A downloaded original.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub bytes: Bytes,
    pub mime: &'static str,
    pub status: u16,
}

pub struct Fetcher {
    client: reqwest::Client,
    policy: NetworkPolicy,
    max_bytes: u64,
    first_byte_timeout: Duration,
}

impl Fetcher {
    /// The most bytes an original may have (`fetch.max_bytes`), downloaded or stored.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn new(config: &FetchConfig, policy: NetworkPolicy) -> Result<Fetcher> {
        let client = guarded_client(
            &policy,
            &ClientLimits {
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                total_timeout: Duration::from_millis(config.total_timeout_ms),
                max_redirects: config.max_redirects,
                user_agent: config.user_agent.clone(),
            },
        )?;
        Ok(Fetcher {
            client,
            policy,
            max_bytes: config.max_bytes,
            first_byte_timeout: Duration::from_millis(config.first_byte_timeout_ms),
        })
    }

    pub async fn fetch(&self, raw_url: &str) -> Result<Fetched> {
        let url = crate::security::parse_outbound_url(raw_url, &self.policy)?;
        let mut response =
            tokio::time::timeout(self.first_byte_timeout, self.client.get(url).send())
                .await
                .map_err(|_| {
                    Error::Timeout(format!(
                        "{raw_url}: no response headers within {} ms",
                        self.first_byte_timeout.as_millis()
                    ))
                })?
                .map_err(|e| classify_client_error(&e, raw_url))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(Error::OriginStatus {
                status,
                url: raw_url.to_string(),
            });
        }
        let declared = response.content_length();
        if declared.is_some_and(|len| len > self.max_bytes) {
            return Err(Error::TooLarge(format!(
                "origin declares more than {} bytes",
                self.max_bytes
            )));
        }
        // One allocation for a declared length, not a copy per doubling.
        let mut body = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| classify_client_error(&e, raw_url))?
        {
            if (body.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(Error::TooLarge(format!(
                    "original is larger than {} bytes",
                    self.max_bytes
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let bytes = body.freeze();
        let format = imaging::sniff(&bytes).ok_or_else(|| {
            Error::UnsupportedImage(format!("{raw_url} is not a JPEG, PNG, GIF or WebP image"))
        })?;
        Ok(Fetched {
            bytes,
            mime: imaging::mime_of(format),
            status,
        })
    }
}
