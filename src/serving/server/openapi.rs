//! The OpenAPI document of the HTTP API (utoipa): what `proto/openapi.json`
//! holds and `/openapi.json` serves, with the served model's id as the one
//! name a completion request may carry.

use utoipa::OpenApi;

use super::*;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gpt-serve",
        description = "OpenAI-compatible completions with speculative cascade decoding"
    ),
    paths(completions, list_models, tokenize, detokenize, health, metrics),
    components(schemas(
        CompletionRequest,
        CompletionResponse,
        Choice,
        Logprobs,
        Usage,
        ErrorBody,
        ErrorDetail,
        ModelList,
        ModelCard,
        TokenizeRequest,
        TokenizeResponse,
        DetokenizeRequest,
        DetokenizeResponse,
        Prompt,
        Stop,
        StreamOptions
    ))
)]
pub struct ApiDoc;

/// The model id `proto/openapi.json` names: the shipped model's, which
/// `serve` gives `models/default` by default.
pub const DOCUMENTED_MODEL_ID: &str = "default";

/// The OpenAPI document of a server serving `models/default` (what
/// `proto/openapi.json` holds).
pub fn openapi_json() -> String {
    openapi_json_for(DOCUMENTED_MODEL_ID)
}

/// The OpenAPI document of a server whose model id is `model_id`: a
/// completion request's `model` is that one name (an enum of one), so a
/// client, or a fuzzer generating requests from the document, sends the
/// name that reaches the engine instead of an arbitrary string (a 404).
pub fn openapi_json_for(model_id: &str) -> String {
    use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
    use utoipa::openapi::RefOr;
    let mut doc = ApiDoc::openapi();
    let request = doc
        .components
        .as_mut()
        .and_then(|c| c.schemas.get_mut("CompletionRequest"));
    if let Some(RefOr::T(Schema::Object(request))) = request {
        let model = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some([model_id]));
        request.properties.insert("model".into(), model.into());
    }
    add_answers_of_every_route(&mut doc);
    doc.to_pretty_json()
        .expect("the OpenAPI document serializes")
}

/// The answers the middleware gives before any handler runs, so every
/// route can give them: 403 for a `Host` the server does not answer for
/// (`--allowed-hosts`, against DNS rebinding) and 503 while draining
/// after SIGTERM. A handler's own 503 (e.g. `/health` still loading)
/// keeps its description.
fn add_answers_of_every_route(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Ref, ResponseBuilder};
    let answer = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    };
    let forbidden =
        answer("The Host header names a host this server does not answer for (--allowed-hosts)");
    let draining = answer("The server is draining after SIGTERM");
    for item in doc.paths.paths.values_mut() {
        for op in [&mut item.get, &mut item.post].into_iter().flatten() {
            let responses = &mut op.responses.responses;
            responses.insert("403".into(), forbidden.clone().into());
            responses
                .entry("503".into())
                .or_insert_with(|| draining.clone().into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_model_is_the_one_name_a_completion_request_may_carry() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json_for("mine")).unwrap();
        let model = &doc["components"]["schemas"]["CompletionRequest"]["properties"]["model"];
        assert_eq!(model["enum"], serde_json::json!(["mine"]));
        assert_eq!(model["type"], "string");
    }

    #[test]
    fn every_route_documents_the_host_refusal_and_the_drain() {
        let doc: serde_json::Value = serde_json::from_str(&openapi_json()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 6);
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                for code in ["403", "503"] {
                    assert!(
                        op["responses"][code].is_object(),
                        "{method} {path} lacks {code}"
                    );
                }
            }
        }
        let health = &doc["paths"]["/health"]["get"]["responses"]["503"];
        assert_eq!(health["description"], "Still loading, or the engine failed");
    }
}
