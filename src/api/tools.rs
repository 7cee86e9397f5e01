//! `POST /tools` and `/mcp`: JSON-RPC 2.0 with MCP-shaped results, as the
//! SAIS server exposed them. Tools: `create_account` (alias
//! `account_setup`) and `dispatch_process`; the older method form
//! `tools/create_account` is accepted too.

use serde_json::{json, Value};

use super::sais::{AccountSetup, ProcessPayload};
use super::{Caller, Context};
use crate::error::Error;

const PROTOCOL_VERSION: &str = "2025-06-18";

/// The JSON-RPC answer, or `None` for a notification (no id: no answer).
pub async fn handle(ctx: &Context, presented_key: Option<&str>, body: &[u8]) -> Option<Value> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(e) => return Some(rpc_error(Value::Null, -32700, &format!("Parse error: {e}"))),
    };
    let id = request.get("id").cloned();
    let (Some(method), Some("2.0")) = (
        request.get("method").and_then(Value::as_str),
        request.get("jsonrpc").and_then(Value::as_str),
    ) else {
        return Some(rpc_error(
            id.unwrap_or(Value::Null),
            -32600,
            "Invalid Request: jsonrpc must be \"2.0\" and method a string",
        ));
    };
    let params = request.get("params").cloned().unwrap_or(Value::Null);
    let result = match method {
        "initialize" => Ok(json!({
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "kiln", "version": env!("CARGO_PKG_VERSION")},
        })),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({"tools": tool_definitions()})),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or("");
            let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
            call_tool(ctx, presented_key, name, arguments).await
        }
        // The README's non-standard form: the tool is the method, params its arguments.
        "tools/create_account" | "tools/account_setup" | "tools/dispatch_process" => {
            let name = method.trim_start_matches("tools/");
            call_tool(ctx, presented_key, name, params).await
        }
        _ if method.starts_with("notifications/") => Ok(Value::Null),
        _ => Err((-32601, format!("Method not found: {method}"))),
    };
    let id = id?;
    Some(match result {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err((code, message)) => rpc_error(id, code, &message),
    })
}

fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

/// A tool's failure is a result with `isError`, as MCP asks; only an
/// unknown tool is a protocol error.
async fn call_tool(
    ctx: &Context,
    presented_key: Option<&str>,
    name: &str,
    arguments: Value,
) -> Result<Value, (i64, String)> {
    let outcome = match name {
        "create_account" | "account_setup" => create_account(ctx, presented_key, arguments).await,
        "dispatch_process" => dispatch_process(ctx, presented_key, arguments).await,
        _ => return Err((-32602, format!("Unknown tool: {name:?}"))),
    };
    Ok(match outcome {
        Ok((text, structured)) => json!({
            "content": [{"type": "text", "text": text}],
            "structuredContent": structured,
            "isError": false,
        }),
        Err(e) => json!({
            "content": [{"type": "text", "text": e.to_string()}],
            "isError": true,
        }),
    })
}

fn arguments_as<T: serde::de::DeserializeOwned>(arguments: Value) -> Result<T, Error> {
    serde_json::from_value(arguments).map_err(|e| Error::InvalidPayload(format!("arguments - {e}")))
}

async fn create_account(
    ctx: &Context,
    presented_key: Option<&str>,
    arguments: Value,
) -> Result<(String, Value), Error> {
    let setup: AccountSetup = arguments_as(arguments)?;
    let caller = ctx.caller(presented_key).await?;
    let answer = ctx.account_setup(&caller, setup).await?;
    let text = format!(
        "Account {}! {} images expected.",
        if answer.created {
            "created successfully"
        } else {
            "updated successfully"
        },
        answer.approx_image_count
    );
    Ok((text, serde_json::to_value(answer)?))
}

async fn dispatch_process(
    ctx: &Context,
    presented_key: Option<&str>,
    arguments: Value,
) -> Result<(String, Value), Error> {
    let payload: ProcessPayload = arguments_as(arguments)?;
    let key = presented_key
        .or(payload.api_key.as_deref())
        .map(str::to_string);
    let caller: Caller = ctx.caller(key.as_deref()).await?;
    let rows = ctx.dispatch(&caller, payload).await?;
    let text = format!("{} media dispatched.", rows.len());
    Ok((text, json!({"media": rows})))
}

fn tool_definitions() -> Value {
    let url = json!({"type": ["string", "null"], "format": "uri"});
    let account_schema = json!({
        "type": "object",
        "properties": {
            "root": {"type": "string", "minLength": 3, "maxLength": 50},
            "approx": {"type": "integer", "minimum": 0},
            "mediaCallbackUrl": url,
            "thumbCallbackUrl": url,
            "apiKey": {"type": ["string", "null"]},
        },
        "required": ["root", "approx"],
    });
    let account_annotations = json!({
        "title": "Create an account",
        "readOnlyHint": false,
        "destructiveHint": false,
        "idempotentHint": false,
        "openWorldHint": false,
    });
    vec![
        json!({
            "name": "create_account",
            "description": "Create or update a SAIS account (storage root, estimated image count, callback URLs).",
            "inputSchema": account_schema,
            "annotations": account_annotations,
        }),
        json!({
            "name": "account_setup",
            "description": "Same as create_account (the name the SAIS server registered).",
            "inputSchema": account_schema,
            "annotations": account_annotations,
        }),
        json!({
            "name": "dispatch_process",
            "description": "Queue image URLs for download and thumbnails; webhooks report progress.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "root": {"type": ["string", "null"]},
                    "images": {"type": "array", "items": {"anyOf": [
                        {"type": "string"},
                        {"type": "object", "properties": {"url": {"type": "string"}, "context": {}}, "required": ["url"]},
                    ]}},
                    "filters": {"type": ["array", "null"], "items": {"type": "string"}},
                    "context": {},
                    "mediaCallbackUrl": url,
                    "thumbCallbackUrl": url,
                    "apiKey": {"type": ["string", "null"]},
                    "wait": {"type": ["boolean", "null"]},
                },
                "required": ["images"],
            },
            "annotations": {
                "title": "Dispatch images",
                "readOnlyHint": false,
                "destructiveHint": false,
                "idempotentHint": true,
                "openWorldHint": true,
            },
        }),
    ]
    .into()
}
