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
    doc.to_pretty_json()
        .expect("the OpenAPI document serializes")
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
}
