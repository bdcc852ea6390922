package interop

// The WIT-SVID profile, judged by go-spiffe v2.9.0's WIT client: FetchWITSVID
// and FetchWITBundles through workloadapi.Client, validation with
// exp/svid/witsvid against the exp/bundle/witbundle set, watches that see a
// rotation (agent.sh sets wit_ttl = "6s"), and a proof of possession signed
// with the private key the agent handed out, checked with go-jose against
// the cnf key go-spiffe extracted.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/exp/bundle/witbundle"
	"github.com/spiffe/go-spiffe/v2/exp/svid/witsvid"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// agent.sh configures wit_ttl = "6s".
const witTTL = 6 * time.Second

func witClient(t *testing.T) *workloadapi.Client {
	t.Helper()
	expectedID(t)
	c, err := workloadapi.New(timeout(t))
	if err != nil {
		t.Fatalf("workloadapi.New: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// checkWITSVID validates svid with go-spiffe against bundles and checks what
// the WIT-SVID spec requires of its header and claims.
func checkWITSVID(t *testing.T, svid *witsvid.SVID, bundles witbundle.Source) *witsvid.SVID {
	t.Helper()
	id := expectedID(t)
	if svid.ID != id {
		t.Fatalf("WIT-SVID ID = %s, want %s", svid.ID, id)
	}
	if svid.Hint != hint {
		t.Fatalf("WIT-SVID hint = %q, want %q", svid.Hint, hint)
	}
	valid, err := witsvid.ParseAndValidate(svid.Marshal(), bundles)
	if err != nil {
		t.Fatalf("witsvid.ParseAndValidate: %v", err)
	}
	if valid.ID != id || valid.KeyID == "" {
		t.Fatalf("validated WIT-SVID: ID %s, kid %q", valid.ID, valid.KeyID)
	}
	// The private key the agent handed out belongs to the cnf key.
	priv, ok := svid.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		t.Fatalf("WIT-SVID private key is %T, want *ecdsa.PrivateKey", svid.PrivateKey)
	}
	if !priv.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(valid.PublicKey) {
		t.Fatal("the WIT-SVID's private key does not match its cnf.jwk")
	}
	tok, err := jwt.ParseSigned(svid.Marshal(), []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatalf("jwt.ParseSigned: %v", err)
	}
	if typ := tok.Headers[0].ExtraHeaders[jose.HeaderType]; typ != "wit+jwt" {
		t.Fatalf("typ = %v, want wit+jwt", typ)
	}
	var claims map[string]any
	if err := tok.UnsafeClaimsWithoutVerification(&claims); err != nil {
		t.Fatal(err)
	}
	if _, ok := claims["aud"]; ok {
		t.Fatal("a WIT-SVID must not carry aud")
	}
	cnf, _ := claims["cnf"].(map[string]any)
	jwk, _ := cnf["jwk"].(map[string]any)
	if jwk["alg"] != "ES256" || jwk["d"] != nil {
		t.Fatalf("cnf.jwk = %v, want a public ES256 key", jwk)
	}
	if life := time.Until(valid.Expiry); life <= 0 || life > witTTL+clockSlack {
		t.Fatalf("WIT-SVID expires in %s, want within the %s TTL", life, witTTL)
	}
	return valid
}

func TestFetchWITSVIDAndBundlesValidateWithGoSpiffe(t *testing.T) {
	c := witClient(t)
	id := expectedID(t)
	svid, err := c.FetchWITSVID(timeout(t), "")
	if err != nil {
		t.Fatalf("FetchWITSVID: %v", err)
	}
	bundles, err := c.FetchWITBundles(timeout(t))
	if err != nil {
		t.Fatalf("FetchWITBundles: %v", err)
	}
	if !bundles.Has(id.TrustDomain()) {
		t.Fatalf("WIT bundles lack %s", id.TrustDomain())
	}
	checkWITSVID(t, svid, bundles)

	// Asking for the caller's own ID gives the same; another ID is refused.
	byID, err := c.FetchWITSVID(timeout(t), id.String())
	if err != nil || byID.ID != id {
		t.Fatalf("FetchWITSVID(%s) = %v, %v", id, byID, err)
	}
	if _, err := c.FetchWITSVID(timeout(t), "spiffe://example.org/someone-else"); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchWITSVID(another ID) = %v, want PermissionDenied", err)
	}

	// WIT-SVID keys and JWT-SVID keys are apart: neither token passes as
	// the other.
	jwtBundles, err := c.FetchJWTBundles(timeout(t))
	if err != nil {
		t.Fatalf("FetchJWTBundles: %v", err)
	}
	if _, err := jwtsvid.ParseAndValidate(svid.Marshal(), jwtBundles, []string{audience}); err == nil {
		t.Fatal("a WIT-SVID validated as a JWT-SVID")
	}
	jsvid, err := c.FetchJWTSVID(timeout(t), jwtsvid.Params{Audience: audience})
	if err != nil {
		t.Fatalf("FetchJWTSVID: %v", err)
	}
	if _, err := witsvid.ParseAndValidate(jsvid.Marshal(), bundles); err == nil {
		t.Fatal("a JWT-SVID validated as a WIT-SVID")
	}
	for _, b := range jwtBundles.Bundles() {
		for kid := range b.JWTAuthorities() {
			if wb, ok := bundles.Get(b.TrustDomain()); ok && wb.HasWITAuthority(kid) {
				t.Fatalf("key %s is both a JWT-SVID and a WIT-SVID key", kid)
			}
		}
	}
}

// A proof of possession made with the handed-out key verifies with the cnf
// key go-spiffe read from the validated WIT-SVID, and not with another.
func TestWITSVIDKeyProvesPossession(t *testing.T) {
	c := witClient(t)
	svid, err := c.FetchWITSVID(timeout(t), "")
	if err != nil {
		t.Fatalf("FetchWITSVID: %v", err)
	}
	bundles, err := c.FetchWITBundles(timeout(t))
	if err != nil {
		t.Fatalf("FetchWITBundles: %v", err)
	}
	valid := checkWITSVID(t, svid, bundles)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: svid.PrivateKey},
		(&jose.SignerOptions{}).WithType("wpt+jwt"))
	if err != nil {
		t.Fatal(err)
	}
	wpt, err := jwt.Signed(signer).Claims(map[string]any{
		"aud": "https://resource.example/path",
		"exp": time.Now().Add(30 * time.Second).Unix(),
		"jti": "interop-1",
	}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := jwt.ParseSigned(wpt, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if err := parsed.Claims(valid.PublicKey, &out); err != nil {
		t.Fatalf("proof does not verify with the cnf key: %v", err)
	}
}

// The agent's raw bundle map: keyed by the trust domain's SPIFFE ID, each
// key with a kid and use wit-svid.
func TestRawWITBundles(t *testing.T) {
	id := expectedID(t)
	c := rawClient(t)
	ctx, cancel := context.WithTimeout(withHeader(context.Background()), callTimeout)
	defer cancel()
	s, err := c.FetchWITBundles(ctx, &workload.WITBundlesRequest{})
	if err != nil {
		t.Fatalf("FetchWITBundles: %v", err)
	}
	r, err := s.Recv()
	if err != nil {
		t.Fatalf("FetchWITBundles recv: %v", err)
	}
	doc, ok := r.Bundles[id.TrustDomain().IDString()]
	if !ok || len(r.Bundles) != 1 {
		t.Fatalf("WIT bundle keys = %v", r.Bundles)
	}
	var jwks struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal([]byte(doc), &jwks); err != nil {
		t.Fatal(err)
	}
	if len(jwks.Keys) == 0 {
		t.Fatal("no WIT-SVID keys")
	}
	for _, k := range jwks.Keys {
		if k["use"] != "wit-svid" || k["kid"] == nil || k["d"] != nil {
			t.Fatalf("WIT bundle key %v", k)
		}
	}
	// Without the security header the agent refuses, as for every RPC.
	s2, err := c.FetchWITSVID(context.Background(), &workload.WITSVIDRequest{})
	if err == nil {
		_, err = s2.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("FetchWITSVID without the header = %v, want InvalidArgument", err)
	}
}

type witWatcher struct {
	svids   chan []*witsvid.SVID
	bundles chan *witbundle.Set
	errs    chan error
}

func (w *witWatcher) OnWITSVIDsUpdate(s []*witsvid.SVID) {
	select {
	case w.svids <- s:
	default:
	}
}

func (w *witWatcher) OnWITBundlesUpdate(b *witbundle.Set) {
	select {
	case w.bundles <- b:
	default:
	}
}

func (w *witWatcher) report(err error) {
	if status.Code(err) == codes.Canceled || errors.Is(err, context.Canceled) {
		return
	}
	select {
	case w.errs <- err:
	default:
	}
}

func (w *witWatcher) OnWITSVIDsWatchError(err error)   { w.report(err) }
func (w *witWatcher) OnWITBundlesWatchError(err error) { w.report(err) }

func TestWatchWITSVIDsSeesRotation(t *testing.T) {
	c := witClient(t)
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout+5*time.Second)
	defer cancel()
	w := &witWatcher{svids: make(chan []*witsvid.SVID, 16), bundles: make(chan *witbundle.Set, 16), errs: make(chan error, 16)}
	go func() { _ = c.WatchWITSVIDs(ctx, w, "") }()
	go func() { _ = c.WatchWITBundles(ctx, w) }()

	var bundles *witbundle.Set
	select {
	case bundles = <-w.bundles:
	case err := <-w.errs:
		t.Fatalf("watch error: %v", err)
	case <-time.After(callTimeout):
		t.Fatal("no WIT bundles from WatchWITBundles")
	}
	deadline := time.After(callTimeout)
	var first *witsvid.SVID
	var firstAt time.Time
	for {
		select {
		case svids := <-w.svids:
			if len(svids) != 1 {
				t.Fatalf("update with %d WIT-SVIDs", len(svids))
			}
			valid := checkWITSVID(t, svids[0], bundles)
			if first == nil {
				first, firstAt = valid, time.Now()
				continue
			}
			if valid.Marshal() == first.Marshal() {
				continue
			}
			if !valid.Expiry.After(first.Expiry) {
				t.Fatalf("rotated expiry %s not after %s", valid.Expiry, first.Expiry)
			}
			if valid.PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(first.PublicKey) {
				t.Fatal("a rotated WIT-SVID binds the same key: it must come with a new one")
			}
			if waited := time.Since(firstAt); waited >= witTTL {
				t.Fatalf("rotation took %s, not before the %s TTL ran out", waited, witTTL)
			}
			return
		case err := <-w.errs:
			t.Fatalf("watch error: %v", err)
		case <-deadline:
			if first == nil {
				t.Fatalf("no WIT-SVID within %s", callTimeout)
			}
			t.Fatalf("no rotated WIT-SVID within %s", callTimeout)
		}
	}
}
