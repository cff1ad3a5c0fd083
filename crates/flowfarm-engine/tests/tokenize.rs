//! Tokenizers against transformers' CLIPTokenizer on the same files, with
//! SD3's padding and truncation. Fixture: tools/parity/make_tokenizer_fixtures.py.

use flowfarm_engine::tokenize::{PromptTokenizer, CLIP_MAX_LENGTH};

#[test]
fn clip_tokenizers_match_transformers_from_either_file_set() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tokenizers");
    let expected: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let prompts: Vec<String> = serde_json::from_value(expected["prompts"].clone()).unwrap();
    for folder in ["tokenizer", "tokenizer_2"] {
        let ids: Vec<Vec<u32>> = serde_json::from_value(expected["ids"][folder].clone()).unwrap();
        // The vocab.json + merges.txt pair alone, without tokenizer.json.
        let pair = tempfile::tempdir().unwrap();
        for file in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
            std::fs::copy(dir.join(folder).join(file), pair.path().join(file)).unwrap();
        }
        for (name, tokenizer) in [
            ("tokenizer.json", PromptTokenizer::open(dir.join(folder), CLIP_MAX_LENGTH).unwrap()),
            ("vocab+merges", PromptTokenizer::open(pair.path(), CLIP_MAX_LENGTH).unwrap()),
        ] {
            for (prompt, want) in prompts.iter().zip(&ids) {
                assert_eq!(&tokenizer.encode(prompt).unwrap(), want, "{folder} from {name}: {prompt:?}");
            }
        }
    }
}
